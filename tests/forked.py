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
import threading
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what the entry points import at module level, and the heavy libraries they import inside
# functions: imported once by the server, never used there (no thread or device state forks).
# peft, bitsandbytes and deepspeed come after (PRELOAD_SILENTLY): they log or warn as they are
# imported, which would otherwise land in the server's replies.
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "datasets",
    "fastchat_data.commands",
    "recipes.core.recipe",
    "recipes.core.loading",
    "launch.train",
)


# the heavy libraries that log or warn as they are imported: imported once as well, with the
# server's output sent to /dev/null meanwhile. They cost a forked run ~3.5 s of its ~5.5 s (a
# 1-process 4-step run: 5.5 s -> 2.1 s; FSDP2 x2 8.8 -> 2.8 s; ZeRO-3 x2 8.9 -> 3.7 s). A
# command's output then lacks their import-time lines, which camelid filters anyway
# (recipes/core/quiet.py) and which the fresh-interpreter tests see (tests/test_cli_help.py).
PRELOAD_SILENTLY = ("peft", "bitsandbytes", "deepspeed", "accelerate", "transformers.optimization")


class ForkServer:
    """One warm interpreter (tests/forked.py run as a script) serving one command at a time.
    Each command gets the environment it is given; what the preloaded modules read from the
    environment as they were imported comes from `env`, the server's."""

    def __init__(self, env: dict):
        self.lock = threading.Lock()
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

    def run(
        self,
        argv: list[str],
        cwd: Path,
        timeout: float,
        *,
        env: dict | None = None,
        nproc: int = 1,
        local_rank_arg: bool = False,
    ) -> subprocess.CompletedProcess:
        """`argv` run as a fork, or with `nproc` > 1 as a one-node job of that many forked
        workers connected as torchrun connects them (`local_rank_arg`: each also gets
        DeepSpeed's launcher's --local_rank=N)."""
        if argv[0] != sys.executable:
            raise ValueError(f"{argv[0]} is not this interpreter; run it as a subprocess")
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"argv": argv[1:], "cwd": str(cwd), "timeout": timeout, "env": env}
            request |= {"nproc": nproc, "local_rank_arg": local_rank_arg}
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


def _become(args: list[str]) -> int:
    """Run the command line `args` (after the interpreter) in this process, as `python -m
    module ...` or `python script.py ...` would, and return its exit status."""
    import runpy
    import traceback

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
            return 0
        if isinstance(stop.code, int):
            return stop.code
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _exit(code: int) -> None:
    import atexit

    try:
        atexit._run_exitfuncs()  # what the interpreter runs at exit; os._exit skips it
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def worker_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """What torchrun (and DeepSpeed's launcher) tell worker `rank` of `nproc` on one node."""
    every = {"WORLD_SIZE": nproc, "LOCAL_WORLD_SIZE": nproc, "ROLE_WORLD_SIZE": nproc}
    ranks = {"RANK": rank, "LOCAL_RANK": rank, "ROLE_RANK": rank, "GROUP_RANK": 0}
    node = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "LOCAL_SIZE": nproc}
    node |= {"CROSS_RANK": 0, "CROSS_SIZE": 1, "TORCHELASTIC_RESTART_COUNT": 0}
    return {k: str(v) for k, v in (every | ranks | node).items()}


def _workers(request: dict) -> int:
    """Fork the job's workers, each its rank of the one-node environment torchrun gives
    (DeepSpeed's launcher also passes --local_rank=N first); wait for all. As torchrun does, the
    first failure stops the others (SIGTERM, then SIGKILL); the job exits with that rank's
    status, as `python -m launch.train` reports it (torchrun alone would say 1)."""
    import signal
    import time

    from recipes.core.world import free_port

    port = free_port()
    nproc, args = request["nproc"], request["argv"]
    pids = []
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            os.environ.update(worker_env(rank, nproc, port))
            local_rank = [f"--local_rank={rank}"] if request["local_rank_arg"] else []
            _exit(_become([args[0], *local_rank, *args[1:]]))
        pids.append(pid)
    failed, running = 0, set(pids)
    while running:
        pid, status = os.wait()
        running.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not failed:
            failed = code if code > 0 else 128 - code  # killed by a signal: as a shell says
            for other in running:
                os.kill(other, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while running and time.monotonic() < deadline:
                done, _ = os.waitpid(-1, os.WNOHANG)
                running.discard(done)
                time.sleep(0.05)
            for other in running:
                os.kill(other, signal.SIGKILL)
    return failed


def _child(request: dict) -> None:
    """In the forked child: become the command (or the job that runs its workers), run it,
    exit with its status."""
    os.setsid()  # its own process group: a timeout kills whatever it started
    os.chdir(request["cwd"])
    if request["env"] is not None:
        os.environ.clear()
        os.environ.update(request["env"])
    # as a fresh interpreter puts PYTHONPATH's folders right after the script's (or the
    # working folder), before the site packages
    for folder in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
        if folder and folder not in sys.path:
            sys.path.insert(1, folder)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        # appended to, so that every worker's lines land whole, as through a launcher's pipe
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        os.dup2(os.open(path, flags, 0o644), fd)
    if request["nproc"] == 1:
        _exit(_become(request["argv"]))
    sys.stdout.flush()
    os._exit(_workers(request))


def _serve() -> None:
    import importlib
    import signal
    import time

    for name in sys.argv[1:]:
        importlib.import_module(name)
    replies = sys.stdout
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        for name in PRELOAD_SILENTLY:
            importlib.import_module(name)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):  # else every forked command holds them open too
            os.close(fd)
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
