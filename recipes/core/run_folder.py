"""The one owner of a run folder's layout: every path in it, and in a checkpoint, is named here.

OUT/
  run.lock                    held by the running job's rank 0 (pid, host, command)
  metrics.jsonl               one row per step, appended; a resume drops rows past its step
  loss.png                    the loss curve (and the reward curve of online RL), at the end
  ranks/rank{r}.json          what each rank is and trained on first, its peak memory
  trackers.json               tracker run ids, so a relaunch continues the same runs
  tensorboard/ wandb/ mlruns/ trackio/   the trackers' own folders
  checkpoints/step-00000010/  one complete checkpoint (see CheckpointFolder)
  checkpoints/.tmp-step-...   a checkpoint being written (never resumed from)
  checkpoints/damaged-step-N/ a checkpoint that failed verification, kept for inspection
  replaced/<time>/            checkpoints and metrics of an earlier run, moved aside by
                              --overwrite_output_dir (never deleted)
  model/                      the exported Hugging Face model (full fine-tune)
  adapter/                    the exported PEFT adapter (adapter runs)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STEP_DIR = re.compile(r"step-(\d+)")
RUN_INFO = "camelid.json"  # in every Hugging Face folder camelid writes: how it was made


def written_by(folder: Path) -> str | None:
    """Which camelid command wrote a Hugging Face folder: its camelid.json's `written_by`
    ("recipe", "merge", "convert_checkpoint"; folders from before it was recorded are a
    recipe's), or None for a folder camelid did not write."""
    info = Path(folder) / RUN_INFO
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text()).get("written_by", "recipe")
    except (OSError, ValueError, AttributeError):
        return None


def written_by_command(command: str) -> Callable[[Path], bool]:
    """The output guard's test for a folder that `command` may replace: one it wrote itself."""
    return lambda folder: written_by(folder) == command


class Entry:
    """A fixed name in a folder: `Entry("COMPLETE")` on a CheckpointFolder reads as
    `checkpoint.complete`, the path `checkpoint.path / "COMPLETE"`."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, folder, owner=None) -> Path:
        return folder / self.name


@dataclass(frozen=True)
class CheckpointFolder:
    """One checkpoint: engine state (DCP shards, DeepSpeed's files, or an adapter and its
    optimizer), the scheduler, every rank's RNG, the trainer state, and COMPLETE, a manifest
    of every file with its size and sha256 (written last: its presence means complete)."""

    path: Path

    complete = Entry("COMPLETE")
    trainer_state = Entry("trainer_state.json")
    scheduler = Entry("scheduler.json")
    dcp = Entry("dcp")
    deepspeed = Entry("deepspeed")
    adapter = Entry("adapter")
    optimizer = Entry("optimizer.pt")

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def step(self) -> int:
        return int(STEP_DIR.fullmatch(self.path.name)[1])

    def rng(self, rank: int) -> Path:
        return self.path / f"rng-rank{rank}.safetensors"


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    lock = Entry("run.lock")
    metrics = Entry("metrics.jsonl")
    loss_png = Entry("loss.png")
    trackers = Entry("trackers.json")
    ranks = Entry("ranks")
    model = Entry("model")
    adapter = Entry("adapter")
    checkpoints = Entry("checkpoints")

    def tracker_dir(self, name: str) -> Path:
        return self.root / {"mlflow": "mlruns"}.get(name, name)

    def rank_file(self, rank: int) -> Path:
        return self.ranks / f"rank{rank}.json"

    def checkpoint(self, step: int) -> CheckpointFolder:
        return CheckpointFolder(self.checkpoints / f"step-{step:08d}")

    def staging(self, step: int) -> Path:
        return self.checkpoints / f".tmp-step-{step:08d}"

    def damaged(self, folder: CheckpointFolder) -> Path:
        kept = folder.path.with_name(f"damaged-{folder.path.name}")
        while kept.exists():
            kept = kept.with_name(kept.name + "+")
        return kept

    def step_folders(self) -> list[CheckpointFolder]:
        """Every checkpoints/step-N folder, complete or not, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [
            CheckpointFolder(p)
            for p in self.checkpoints.iterdir()
            if p.is_dir() and STEP_DIR.fullmatch(p.name)
        ]
        return sorted(found, key=lambda c: c.step)

    def complete_checkpoints(self) -> list[CheckpointFolder]:
        return [c for c in self.step_folders() if c.complete.exists()]

    def incomplete_checkpoints(self) -> list[CheckpointFolder]:
        """step-N folders without a manifest: not resumable, never deleted by rotation."""
        return [c for c in self.step_folders() if not c.complete.exists()]

    def latest_checkpoint(self) -> CheckpointFolder | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def replaced(self) -> Path:
        """Where --overwrite_output_dir moves an earlier run's checkpoints and metrics."""
        return self.root / "replaced" / time.strftime("%Y%m%d-%H%M%S")

    def export(self, adapter: bool) -> Path:
        return self.adapter if adapter else self.model

    def declare_owned(self) -> None:
        """List the run's own entries in OUT/.camelid-owned (rank 0, at the run's start)."""
        from fastchat_data.outputs import OWNED

        entries = [
            self.lock,
            self.metrics,
            self.loss_png,
            self.trackers,
            self.ranks,
            self.checkpoints,
            self.model,
            self.adapter,
            self.root / "replaced",
            *(self.tracker_dir(n) for n in ("tensorboard", "wandb", "mlflow", "trackio")),
        ]
        (self.root / OWNED).write_text("".join(f"{p.name}\n" for p in entries))
