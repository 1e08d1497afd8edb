"""A recipe run with faults injected through the loop's Hooks (recipes/core/loop.py), as the
tests start it: `python tests/fault_recipe.py --recipe sft [--nan_at STEP[:RANK]]
[--step_delay S] -- RECIPE OPTIONS`, alone or under torchrun / the deepspeed launcher.

- `--nan_at 3` makes step 3's loss NaN on every rank (`3:1`: on rank 1 only), as a poisoned
  batch would;
- `--nan_weight_at 3` turns one weight NaN right after step 3's update, as a degenerate
  update (an epsilon of 0, an overflow) would;
- `--full_disk_at 4` makes the engine's checkpoint writes fail from step 4 on with ENOSPC, as
  a full disk would during that step's checkpoint;
- `--step_delay 0.2` pauses after each step, so that an external kill lands at a chosen step
  of a tiny model whose steps take milliseconds.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.core import recipe  # noqa: E402
from recipes.core.loop import Hooks  # noqa: E402


class Faults(Hooks):
    def __init__(
        self,
        nan_at: str | None,
        step_delay: float,
        *,
        nan_weight_at: int | None = None,
        full_disk_at: int | None = None,
    ):
        self.step_delay, self.nan_weight_at = step_delay, nan_weight_at
        self.full_disk_at = full_disk_at
        self.nan_step, self.nan_rank = None, None
        if nan_at:
            step, _, rank = nan_at.partition(":")
            self.nan_step, self.nan_rank = int(step), int(rank) if rank else None

    def loss(self, run, loss):
        poisoned = run.step + 1 == self.nan_step and self.nan_rank in (None, run.world.rank)
        return loss * float("nan") if poisoned else loss

    def after_update(self, run):
        if run.step + 1 == self.full_disk_at:
            import errno

            def full_disk(folder):
                raise OSError(errno.ENOSPC, "No space left on device", str(folder.path))

            run.engine.save = full_disk
        if run.step + 1 == self.nan_weight_at:
            import torch

            with torch.no_grad():
                weight = next(p for p in run.engine.module.parameters() if p.requires_grad)
                # this rank's share: FSDP2's local shard, ZeRO-3's partition, else the tensor
                local = weight.to_local() if hasattr(weight, "to_local") else weight
                local = getattr(weight, "ds_tensor", local)
                if local.numel():
                    local.view(-1)[:1] = float("nan")

    def after_step(self, run):
        time.sleep(self.step_delay)


def main() -> int:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    own, recipe_args = argv[:cut], argv[cut + 1 :]
    # the deepspeed launcher puts --local_rank=N first; it is the recipe's, not ours
    recipe_args += [a for a in own if a.startswith("--local_rank")]
    own = [a for a in own if not a.startswith("--local_rank")]
    options = dict(zip(own[::2], own[1::2]))
    numbers = {
        k: int(options[f"--{k}"]) for k in ("nan_weight_at", "full_disk_at") if f"--{k}" in options
    }
    faults = Faults(options.get("--nan_at"), float(options.get("--step_delay", 0)), **numbers)
    name = options.get("--recipe", "sft")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return recipe.main(name, recipe_args, hooks=faults)


if __name__ == "__main__":
    sys.exit(main())
