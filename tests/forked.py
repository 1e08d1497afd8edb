"""Command lines run as forks of a warm interpreter: what a subprocess gives a test (its own
process, argv, working folder, exit status, stdout and stderr) without paying for a fresh
interpreter and its imports on every command.

A command that fails on its input spends ~3 s of CPU importing torch, transformers and datasets
before the ~0.1 s that reads and refuses the input; the bad-input table runs ~200 of them. A
server process imports those once (`PRELOAD`) and forks a child per command; the child takes
the command's argv, folder and output files and runs it as `python -m module` or `python
script.py` would (`runpy`, `__name__ == "__main__"`), then exits with its status.

What a fork does not show is what only a fresh interpreter shows: import-time failures of the
entry points and start-up warnings. Those stay covered by the tests that start real
subprocesses (tests/test_cli_help.py runs every entry point's --help from scratch).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what the entry points import at module level, and the heavy libraries they import inside
# functions: imported once by the server, never used there (no thread or device state forks)
PRELOAD = (
    "torch",
    "transformers",
    "datasets",
    "fastchat_data.commands",
    "recipes.core.recipe",
    "recipes.core.loading",
    "launch.train",
)


class ForkServer:
    """One warm interpreter (tests/forked.py run as a script) serving one command at a time."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *PRELOAD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO,
            text=True,
        )
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the fork server did not start: {ready!r}")

    def run(self, argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        if argv[0] != sys.executable:
            raise ValueError(f"{argv[0]} is not this interpreter; run it as a subprocess")
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"argv": argv[1:], "cwd": str(cwd), "timeout": timeout}
            request |= {"stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            if not reply:
                raise RuntimeError("the fork server died")
            code = json.loads(reply)["returncode"]
            return subprocess.CompletedProcess(
                argv, code, out.read_text(errors="replace"), err.read_text(errors="replace")
            )

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@contextmanager
def fork_servers(count: int, env: dict):
    """`count` servers in a queue: take one for a command, put it back after."""
    servers = [ForkServer(env) for _ in range(count)]
    pool: queue.Queue[ForkServer] = queue.Queue()
    for server in servers:
        pool.put(server)
    try:
        yield pool
    finally:
        for server in servers:
            server.close()


# -- the server side --------------------------------------------------------------------------


def _child(request: dict) -> None:
    """In the forked child: become the command, run it, exit with its status."""
    import atexit
    import runpy
    import traceback

    os.setsid()  # its own process group: a timeout kills whatever it started
    os.chdir(request["cwd"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    args = request["argv"]
    code = 0
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path[0] = os.getcwd()  # as `python -m` puts the working folder first
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            sys.path[0] = str(Path(args[0]).resolve().parent)  # as `python script.py` does
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what the interpreter runs at exit; os._exit skips it
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve() -> None:
    import importlib
    import signal
    import time

    for name in sys.argv[1:]:
        importlib.import_module(name)
    replies = sys.stdout
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.01)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"returncode": code}), file=replies, flush=True)


if __name__ == "__main__":
    _serve()
