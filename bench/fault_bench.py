"""Fault injection: kill -9 a training run at random moments and relaunch it, again and again.
The kills rotate over three moments: inside a checkpoint write (the tiny model saves every
step), while a relaunch is resuming (verifying and loading the checkpoint, repairing the
metrics log, before its first new step), and at any moment. Every relaunch must resume from
the newest complete checkpoint, and the run must end on exactly the loss curve of an
uninterrupted run.

    python -m bench.fault_bench [--kills 20] [--steps 120] [--seed 0]

Prints a table and writes bench/results/fault_bench.json.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import REPO, result_option, write_json
from fastchat_data.options import entry_point, option, parse


@dataclass
class FaultBenchOptions:
    kills: int = option(20, "kill -9s at random moments, each followed by a relaunch", minimum=1)
    steps: int = option(120, "optimizer steps of the run", minimum=2)
    quick: bool = option(False, "a short run", preset={"kills": 6, "steps": 30})
    seed: int = option(0, "seed of the random kill moments")
    out: str = result_option("fault_bench.json")


def assets() -> tuple[Path, Path]:
    """The demo's tiny Llama and identity conversations (what `make train-vicuna` trains on
    when no MODEL is given), built once under .cache/fault_bench."""
    from fastchat_data import demo

    return demo.model_and_data(REPO / ".cache" / "fault_bench", quiet=True)


def command(out: Path, steps: int, model: Path, *, data: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "recipes" / "full_finetune.py"),
        "--config",
        "tiny_cpu.yaml",
        "--model_name_or_path",
        str(model),
        "--data_path",
        str(data),
        "--strategy",
        "single",
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--max_steps",
        str(steps),
        "--save_steps",
        "1",
        "--save_total_limit",
        "2",
        "--logging_steps",
        "1000",
    ]


MOMENTS = ("mid_save", "during_resume", "any")


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def complete_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    if not root.exists():
        return []
    return sorted(
        int(p.name[5:])
        for p in root.iterdir()
        if re.fullmatch(r"step-\d+", p.name) and (p / "COMPLETE").exists()
    )


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_with_kills(
    out: Path, steps: int, kills: int, *, rng: random.Random, model: Path, data: Path
) -> dict:
    events, launches = [], 0
    while True:
        before = complete_steps(out)
        launches += 1
        log = out.parent / f"{out.name}-launch{launches}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                command(out, steps, model, data=data),
                env=environment(),
                cwd=REPO,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            killed = None
            if len(events) < kills:
                start = logged_steps(out)
                # mid_save: once this launch trains, at a random moment inside a checkpoint
                # write (its .tmp folder exists); during_resume: right after the relaunch
                # loaded its checkpoint; any: once it trains, at any random moment
                while proc.poll() is None and logged_steps(out) <= start:
                    time.sleep(0.01)
                moment = MOMENTS[len(events) % len(MOMENTS)]
                if moment == "during_resume" and before:
                    # as soon as the relaunch has loaded the checkpoint, before its first step
                    while proc.poll() is None and "resumed from" not in log.read_text():
                        time.sleep(0.001)
                elif moment == "during_resume":
                    moment = "any"  # nothing to resume yet: the first launch
                if moment != "during_resume":
                    while proc.poll() is None and logged_steps(out) <= start:
                        time.sleep(0.01)
                if moment == "mid_save":
                    while proc.poll() is None and not list(out.glob("checkpoints/.tmp-step-*")):
                        time.sleep(0.001)
                    time.sleep(rng.uniform(0.0, 0.02))
                elif moment == "any":
                    time.sleep(rng.uniform(0.0, 0.6))
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
            proc.wait()
        text = log.read_text()
        resumed = re.search(r"resumed from \S+ \(step (\d+)\)", text)
        event = {
            "launch": launches,
            "complete_before": before[-1] if before else 0,
            "resumed_from": int(resumed.group(1)) if resumed else 0,
            "damaged_reported": "failed verification" in text,
            "exit": proc.returncode,
        }
        if killed:
            event["moment"] = moment
        if killed:
            tmp = (
                list((out / "checkpoints").glob(".tmp-step-*"))
                if (out / "checkpoints").exists()
                else []
            )
            event["mid_save"] = bool(tmp)  # killed while a checkpoint was being written
            events.append(event)
            continue
        return {"events": events, "final": event, "launches": launches}


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(FaultBenchOptions, argv, prog="python -m bench.fault_bench", description=__doc__)
    rng = random.Random(opts.seed)
    model, data = assets()
    with tempfile.TemporaryDirectory(prefix="camelid-faults-") as tmp:
        straight, faulty = Path(tmp) / "straight", Path(tmp) / "faulty"
        t0 = time.time()
        subprocess.run(
            command(straight, opts.steps, model, data=data),
            env=environment(),
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        result = run_with_kills(faulty, opts.steps, opts.kills, rng=rng, model=model, data=data)
        ref, got = losses(straight), losses(faulty)
        events = result["events"]
        # each relaunch (the one after kill i) resumed from the newest complete checkpoint
        relaunches = events[1:] + [result["final"]]
        resumed_right = sum(e["resumed_from"] == e["complete_before"] for e in relaunches)
        summary = {
            "kills": len(events),
            "kills_mid_checkpoint_write": sum(e["mid_save"] for e in events),
            "kills_during_resume": sum(e["moment"] == "during_resume" for e in events),
            "relaunches": len(relaunches),
            "relaunches_resumed_from_newest_complete": resumed_right,
            "damaged_checkpoints_reported": sum(e["damaged_reported"] for e in relaunches),
            "final_exit": result["final"]["exit"],
            "steps": opts.steps,
            "steps_logged": len(got),
            "max_abs_loss_diff_vs_uninterrupted": max(abs(a - b) for a, b in zip(ref, got))
            if len(ref) == len(got)
            else None,
            "identical_loss_curve": ref == got,
            "seconds": round(time.time() - t0, 1),
        }
    width = max(map(len, summary))
    print("fault injection: kill -9 at random moments, relaunch, compare with an uninterrupted run")
    for k, v in summary.items():
        print(f"  {k:<{width}}  {v}")
    write_json(opts.out, {"summary": summary, "events": events})
    ok = (
        summary["identical_loss_curve"]
        and resumed_right == len(relaunches)
        and summary["final_exit"] == 0
        and summary["damaged_checkpoints_reported"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
