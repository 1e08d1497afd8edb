"""Runs that move: a run resumes under another strategy or world size, from a moved run folder or
another spelling of its path, and gives the loss curve it would have given uninterrupted. Its
identity is what is trained (settings, the global batch size, the model, the data), never where
or how (output folder, strategy, world size, the split of the global batch).

Every run here trains the tiny model for 10 steps at global batch 8 (4 per device x 2
accumulation on one process, 4 x 1 on two, 2 x 1 on four), saving every step; a move copies a
run folder's checkpoints up to some step elsewhere and resumes it under another strategy. The
uninterrupted one-process run is the reference. The multi-process moves form one chain, so that
each multi-process run is both the target of one move and the source of the next; every
strategy and world size of the chain is written by one and read by another:

    single (reference) -3-> DDP x2 -4-> FSDP2 x2 -5-> ZeRO-3 x2 -6-> ZeRO-2 x2 -7-> FSDP2 x4
        -8-> ZeRO-3 x4 -9-> single;                 FSDP2 x2 -5-> single
(-k-> : moved with the checkpoints up to step k, resumed from step k). The LoRA and DPO moves
are in tests/test_qlora.py and tests/test_dpo.py."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import train_utils
from train_utils import flags, losses, train

K, STEPS = 3, 10
BASE = [
    *flags(
        config="tiny_cpu.yaml",
        learning_rate="1e-3",
        save_steps=1,
        save_total_limit=0,
        logging_steps=1,
        per_device_train_batch_size=4,
    ),
]


def args(nproc: int, steps: int = STEPS) -> list:
    """Global batch 8 on 1, 2 or 4 processes."""
    per_device = min(4, 8 // nproc)
    return [
        *BASE,
        *flags(per_device_train_batch_size=per_device, max_steps=steps),
        *flags(gradient_accumulation_steps=8 // (per_device * nproc)),
    ]


moved = partial(train_utils.moved, step=K)


def resumed(strategy: str, nproc: int, out: str, at: int = K) -> list[float]:
    res = train(strategy, nproc, Path(out), *args(nproc))
    assert f"(step {at})" in res.stdout and "resumed from" in res.stdout, res.stdout[-2000:]
    return losses(Path(out))


def assert_same_curve(got: list[float], reference: list[float], at: int = K) -> None:
    assert len(got) == STEPS
    train_utils.assert_same_curve(got, reference, at)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    train("single", 1, out, *args(1))
    return out


# The chain of moves: (a strategy, its world size); each link resumes the one before it, moved
# with its checkpoints up to the step given (the first link resumes the reference).
CHAIN = [("ddp", 2), ("fsdp", 2), ("zero3", 2), ("zero2", 2), ("fsdp", 4), ("zero3", 4)]


@pytest.fixture(scope="module")
def chain(reference, tmp_path_factory):
    """`chain(i)`: the run folder of link i (run on first use, with the links before it), which
    resumed link i - 1 at step K + i and said what moved."""
    runs = {-1: reference}

    def run(i: int) -> Path:
        if i not in runs:
            source = run(i - 1)
            writer = "single x 1" if i == 0 else "{} x {}".format(*CHAIN[i - 1])
            strategy, nproc = CHAIN[i]
            out = moved(source, tmp_path_factory.mktemp(f"link{i}") / "run", step=K + i)
            res = train(strategy, nproc, Path(out), *args(nproc))
            assert f"(step {K + i})" in res.stdout and "resumed from" in res.stdout, res.stdout
            assert f"note: moved: written by {writer}, resumed by {strategy} x {nproc}" in (
                res.stdout
            )
            runs[i] = Path(out)
        return runs[i]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("link", range(len(CHAIN)), ids=lambda i: "{}x{}".format(*CHAIN[i]))
def test_a_link_of_the_chain_continues_the_reference_curve(reference, chain, link):
    assert_same_curve(losses(chain(link)), losses(reference), at=K + link)


def test_moved_folder_and_another_spelling_resume_exactly(reference, tmp_path):
    out = moved(reference, tmp_path / "elsewhere")
    got = resumed("single", 1, out)
    assert got[K:] == pytest.approx(losses(reference)[K:], abs=1e-6)


@pytest.mark.slow
def test_fsdp_two_to_one_process(reference, chain, tmp_path):
    out = moved(chain(1), tmp_path / "m", step=K + 2)
    assert_same_curve(resumed("single", 1, out, at=K + 2), losses(reference), at=K + 2)


def one_line_error(res) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    return lines[0]


def test_global_batch_change_is_refused_then_allowed_with_the_flag(reference, tmp_path):
    out = Path(moved(reference, tmp_path / "m"))
    doubled = [*args(1), "--per_device_train_batch_size", 8]  # 8 x 2 = 16
    line = one_line_error(train("single", 1, out, *doubled, check=False))
    assert "the global batch size differs: 8 -> 16" in line
    assert (
        "resume with a global batch" in line
        and "of 8 (here: --gradient_accumulation_steps 1" in line
    )
    assert "--allow_global_batch_change True" in line and "overwrite" not in line
    assert len(losses(out)) == STEPS  # nothing written by the refused command
    res = train("single", 1, out, *doubled, "--allow_global_batch_change", "True")
    assert "resuming with another global batch size (8 -> 16)" in res.stdout
    assert f"(step {K})" in res.stdout and len(losses(out)) == STEPS
    # the new batch size is the run's own now: a plain relaunch resumes it
    last = out / "checkpoints" / f"step-{STEPS:08d}"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["identity"]["settings"]["global_batch_size"] == 16


def test_another_setting_is_refused_without_suggesting_overwrite(reference, tmp_path):
    out = Path(moved(reference, tmp_path / "m"))
    res = train("single", 1, out, *args(1), "--learning_rate", "5e-4", check=False)
    line = one_line_error(res)
    assert "holds checkpoints of another run (settings differ: learning_rate 0.001 -> 0.0005)" in (
        line
    )
    assert "another --output_dir" in line and "overwrite" not in line


def test_a_larger_max_steps_follows_the_new_schedule_from_the_next_step(reference, tmp_path):
    import torch
    from transformers import get_scheduler

    out = Path(moved(reference, tmp_path / "m"))
    longer = STEPS + 4
    train("single", 1, out, *args(1, steps=longer))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # steps 1..3 followed the 10-step schedule; from step 4 on, the 14-step one (warm-up
    # ceil(0.1 x 14) = 2 steps, cosine to 0 at step 14), with no step at a stale rate
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = get_scheduler("cosine", opt, math.ceil(0.1 * longer), longer)
    planned = []
    for _ in range(longer):
        planned.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    ref = [json.loads(x)["lr"] for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows[:K]] == ref[:K]
    assert [r["lr"] for r in rows[K:]] == pytest.approx(planned[K:], rel=1e-12)


def test_identity_of_a_checkpoint_from_before_holds_its_global_batch():
    from recipes.core.checkpoint import identity_changes, saved_identity

    old = {
        "identity": {
            "settings": {
                "learning_rate": 1e-3,
                "strategy": "ddp",
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 1,
            },
            "model": "m",
            "data": {"d.json": "x"},
        },
        "world_size": 2,
    }
    now = {
        "settings": {"learning_rate": 1e-3, "global_batch_size": 8},
        "model": "m",
        "data": {"d.json": "x"},
    }
    assert identity_changes(saved_identity(old), now) == []
    now["settings"]["global_batch_size"] = 16
    assert identity_changes(saved_identity(old), now) == ["the global batch size differs: 8 -> 16"]


@pytest.mark.slow
def test_zero3_checkpoints_after_the_move_are_deepspeeds_own(chain):
    assert (chain(2) / "checkpoints" / f"step-{STEPS:08d}" / "deepspeed").is_dir()


@pytest.mark.slow
def test_zero3_to_zero2_leaves_no_conversion_behind(chain):
    # the conversion DeepSpeed needed is gone; the checkpoints it read are as they were
    assert sorted(p.name for p in (chain(3) / "checkpoints").iterdir()) == [
        f"step-{s:08d}" for s in range(1, STEPS + 1)
    ]


@pytest.mark.slow
def test_zero3_four_to_one_process(reference, chain, tmp_path):
    out = moved(chain(5), tmp_path / "m", step=K + 6)
    assert_same_curve(resumed("single", 1, out, at=K + 6), losses(reference), at=K + 6)


def test_an_adapter_checkpoint_under_deepspeed_is_refused_in_one_line(tmp_path):
    from types import SimpleNamespace

    from recipes.core import parallel
    from recipes.core.checkpoint import load_route
    from recipes.core.config import ConfigError
    from recipes.core.run_folder import CheckpointFolder

    ckpt = CheckpointFolder(tmp_path / "step-00000003")
    ckpt.adapter.mkdir(parents=True)
    state = {"strategy": "ddp", "world_size": 2}
    torch_world = SimpleNamespace(strategy=parallel.get("fsdp"), size=4)
    assert load_route(ckpt, state, torch_world) == "native"
    zero = SimpleNamespace(strategy=parallel.get("zero2"), size=2)
    with pytest.raises(ConfigError, match="holds an adapter written by ddp; zero2 cannot"):
        load_route(ckpt, state, zero)
