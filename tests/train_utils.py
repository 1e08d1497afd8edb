"""Running the full fine-tune recipe from tests, as a user would (torchrun / deepspeed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "full_finetune.py"
QLORA = REPO / "recipes" / "qlora.py"
BIN = Path(sys.executable).parent


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    return e


def command(strategy: str, nproc: int, out: Path, *args, recipe: Path = RECIPE) -> list[str]:
    recipe = [
        str(recipe),
        "--strategy",
        strategy,
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        *map(str, args),
    ]
    if nproc == 1:
        return [sys.executable, *recipe]
    if strategy.startswith("zero"):
        return [
            str(BIN / "deepspeed"),
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(29500 + os.getpid() % 500),
            *recipe,
        ]
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), *recipe]


def train(
    strategy: str, nproc: int, out: Path, *args, check: bool = True, recipe: Path = RECIPE
) -> subprocess.CompletedProcess:
    res = subprocess.run(
        command(strategy, nproc, out, *args, recipe=recipe),
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
        timeout=900,
    )
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def ranks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]
