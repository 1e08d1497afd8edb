"""A wheel built from the tree, installed into a fresh virtualenv (its dependencies taken from
this one, never camelid's source tree), runs a 2-process ZeRO-3 job from another folder: the
package ships everything a run needs (the DeepSpeed configs, the recipes' YAMLs, the
launchers)."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import REPO, env, flags, tiny_assets


def source_copy(dest: Path) -> Path:
    """The files git would ship (tracked, and untracked ones it does not ignore), copied to
    `dest`: a build in the tree itself leaves build/ there, whose stale build/lib can carry a
    deleted module into the next wheel."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is not shipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.mark.slow
def test_an_installed_wheel_runs_zero3_on_two_processes(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source_copy(tmp_path / "src")),
        ],
        check=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("camelid-*.whl")
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = fresh / "bin" / "python"
    target = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, str(wheel)],
        check=True,
        timeout=600,
    )
    # the dependencies (torch, transformers, deepspeed, ...) from this environment: a path line,
    # so this environment's own .pth files (camelid's editable install among them) do not run
    (fresh_deps,) = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    (Path(target) / "deps.pth").write_text(fresh_deps + "\n")
    where = subprocess.run(
        [python, "-c", "import recipes, ds_configs; print(recipes.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert where.startswith(target), where  # the installed package, not the tree
    model, data = tiny_assets()
    out = tmp_path / "run"
    res = subprocess.run(
        [
            python,
            "-m",
            "launch.train",
            *flags(ngpu="2", strategy="zero3", model=model, data=data, out=str(out)),
            "--",
            *flags(max_steps="2", report_to="none"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env(),
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == f"exported model: {out / 'model'}"
    ranks = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["strategy"] == "zero3"
