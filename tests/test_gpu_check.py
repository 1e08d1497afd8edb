"""The GPU proof kit (bench/gpu_check.py, bench/gpu_wheels.py) on the CPU: a dry run of the
same script on tiny shapes, so that the kit does not rot between GPU loans.

The dry run trains through camelid's command lines exactly as on a GPU (one process per row);
five rows keep it near a minute here: the bf16-vs-fp32 pair, two attention kernels on packed
rows, and DPO. Every other row must be reported too, skipped with its reason."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from train_utils import flags

from bench.gpu_check import checks, grid, training_row
from bench.gpu_wheels import (
    IMAGE_PACKAGES,
    camelid_imports,
    dist_of_module,
    on_image_or_carried,
    req_name,
    requirements,
    slim_wheel,
)

REPO = Path(__file__).resolve().parents[1]
ROWS = ("check-bf16-20steps", "check-fp32-20steps", "attn-sdpa_packed", "attn-sdpa", "dpo-1b-1024")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "gpu_check.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.gpu_check",
        "--dry_run",
        *flags(rows=",".join(ROWS), out=str(out), work=str(tmp / "work")),
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return json.loads(out.read_text()), res.stdout, out


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_row_is_reported_in_order_and_the_chosen_ones_ran(dry_run):
    report, _, _ = dry_run
    assert report["dry_run"] is True
    assert [r["id"] for r in report["rows"]] == [r.id for r in grid()]
    by = {r["id"]: r for r in report["rows"]}
    assert {k for k, r in by.items() if r["status"] == "ok"} == set(ROWS), {
        k: r.get("reason") for k, r in by.items() if k in ROWS
    }
    for row in report["rows"]:
        if row["status"] != "ok":
            assert row["status"] == "skipped" and row["reason"].strip(), row


def test_measured_numbers_are_finite(dry_run):
    report, _, _ = dry_run
    assert finite(report["matmul"]["tflops"]) and report["matmul"]["tflops"] > 0
    for row in report["rows"]:
        if row["status"] != "ok":
            continue
        steps = row["config"]["steps"]
        assert row["steps_done"] == steps
        assert len(row["losses"]) == steps and all(finite(x) and x > 0 for x in row["losses"])
        assert all(finite(x) for x in row["grad_norms"])
        for key in ("tokens_per_s", "mfu", "step_s", "tokens_per_step"):
            assert finite(row[key]) and row[key] > 0, (row["id"], key, row[key])
        assert row["stopped"] in ("checkpoint", "exit")
        if row["section"] in ("bf16", "dpo"):  # camelid's planner was asked
            assert finite(row["plan"]["total_gb"]) and row["plan"]["total_gb"] > 0


def test_rows_that_need_a_gpu_or_a_package_say_why(dry_run):
    report, _, _ = dry_run
    by = {r["id"]: r for r in report["rows"]}
    assert "CUDA" in by["single-2048-packed-flex"]["reason"]
    assert "CUDA" in by["attn-fa2"]["reason"]
    assert (
        "CUDA" in by["single-2048-packed-flex-liger"]["reason"]
        or "GPU" in by["single-2048-packed-flex-liger"]["reason"]
    )
    assert "GPU" in by["zero3-2048-packed-flex"]["reason"]
    assert "CUDA" in by["fsdp-2048-packed-flex"]["reason"]  # 1-process FSDP2 runs, on a GPU
    assert "row set" in by["single-2048-packed-sdpa"]["reason"]  # runnable here, not chosen


def test_the_correctness_checks_ran_and_passed(dry_run):
    report, _, _ = dry_run
    checks = {c["check"]: c for c in report["checks"]}
    names = {
        "bf16 losses vs fp32, every step",
        "attention kernels agree on packed rows (step 1, vs sdpa_packed)",
        "DPO first loss is log 2 (policy = reference)",
        "camelid's imports on these runs are on the GPU image or carried",
    }
    for name in names:
        assert checks[name]["pass"] is True, checks[name]
    assert checks["bf16 losses vs fp32, every step"]["n"] == 20


def test_a_table_is_printed_and_written(dry_run):
    _, stdout, out = dry_run
    assert "| row | status | tok/s | MFU |" in stdout
    assert "| check | result |" in stdout
    md = out.with_suffix(".md").read_text()
    assert "DRY RUN" in md and "check-bf16-20steps | ok" in md


# ---------------------------------------------------------------- the wheel list (no network)


def test_every_carried_wheel_and_camelid_runtime_import_is_accounted_for():
    assert on_image_or_carried("datasets") and on_image_or_carried("torch")
    assert not on_image_or_carried("flash-attn")
    assert (
        dist_of_module("yaml") == "pyyaml"
        and dist_of_module("liger_kernel.transformers") == "liger-kernel"
    )
    imports = camelid_imports()
    # what every recipe run imports directly is on the image or carried
    for module in ("torch", "transformers", "datasets", "yaml", "safetensors", "peft", "numpy"):
        assert module in imports and on_image_or_carried(dist_of_module(module)), module
    assert "torch" in IMAGE_PACKAGES


def test_slim_wheel_keeps_the_named_libraries_and_a_matching_record(tmp_path):
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    files = {
        "pkg/__init__.py": b"x = 1\n",
        "pkg/lib_a.so": b"a" * 100,
        "pkg/lib_b.so": b"b" * 100,
        "pkg-1.0.dist-info/METADATA": b"Name: pkg\nRequires-Dist: numpy>=1\n"
        b"Requires-Dist: pytest; extra == 'dev'\n",
    }
    record = "".join(f"{n},sha256=x,{len(d)}\n" for n, d in files.items())
    with zipfile.ZipFile(whl, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("pkg-1.0.dist-info/RECORD", record + "pkg-1.0.dist-info/RECORD,,\n")
    _, removed = slim_wheel(whl, ("lib_a.so",))
    assert removed == ["pkg/lib_b.so"]
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        rec = z.read("pkg-1.0.dist-info/RECORD").decode()
    assert "pkg/lib_a.so" in names and "pkg/lib_b.so" not in names
    assert "pkg/lib_b.so" not in rec and "pkg/lib_a.so" in rec
    assert [req_name(r) for r in requirements(whl)] == ["numpy"]


def test_row_names_spell_their_settings():
    row = training_row("single-4096-packed-flex-compile-liger-gc")
    assert (row.strategy, row.max_len, row.batch, row.attn) == ("single", 4096, 4, "flex_attention")
    assert row.packing and row.compile and row.liger and row.gc and row.warmup == 3
    grouped = training_row("zero3-2048-grouped-sdpa_packed")
    assert grouped.torchrun and not grouped.packing and grouped.attn == "sdpa_packed"
    assert len({r.id for r in grid()}) == len(grid())


def test_the_import_check_flags_a_module_that_would_be_missing_on_the_gpu():
    ok = {"status": "ok", "losses": [1.0], "grad_norms": [1.0], "modules": ["torch", "fire"]}
    audit = {"torch": ["x.py:1"], "fire": ["fastchat_data/cli.py:23"]}
    (check,) = [c for c in checks({"row": ok}, audit) if "imports" in c["check"]]
    assert check["pass"] is False and check["value"] == {"fire": ["row"]}
