"""--help of many entry points, all in one fresh interpreter (each `main` is what `python -m`
runs), to keep it cheap: what the newcomer's and the README's checks both run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# each name is a module, or "module command" for a command of the data tools' cli
PROBE = """
import contextlib, importlib, io, json, sys
results = {}
for name in json.loads(sys.argv[1]):
    module, *command = name.split()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = importlib.import_module(module).main([*command, "--help"])
    except SystemExit as e:
        code = e.code
    results[name] = [code, out.getvalue()]
print(json.dumps(results))
"""


def helps(names: list[str], *, cwd: Path, env: dict[str, str]) -> dict[str, tuple[object, str]]:
    """Each name's (exit code or `main`'s return, --help text), run from `cwd` under `env`."""
    res = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(names)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout.strip().splitlines()[-1])
    return {name: (code, text) for name, (code, text) in results.items()}
