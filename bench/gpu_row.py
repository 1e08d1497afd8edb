"""One row of bench/gpu_check.py: a camelid recipe run exactly as its command line runs it
(the script as `__main__` with its arguments), plus a record of the process's peak memory.

    python bench/gpu_row.py --record FILE [--stop_at_checkpoint] -- recipes/full_finetune.py ARGS
    torchrun --standalone --nproc_per_node 1 bench/gpu_row.py --record FILE -- recipes/...

Of camelid only its option parser (fastchat_data.options) is imported here, and nothing of it
is patched; two torch entry points are wrapped:
- `torch.cuda.reset_peak_memory_stats`: camelid resets the peak between its phases (load,
  setup, train, export); the wrapper first folds `max_memory_allocated()` into its own
  record, so the record holds the peak of the whole run and of each phase segment.
- with --stop_at_checkpoint: the first checkpoint save (torch.distributed.checkpoint.save, or
  DeepSpeedEngine.save_checkpoint under ZeRO) writes the record and ends the process with
  status 0. The kit sets --save_steps beyond --max_steps, so the first save is the one after
  the last step: every step has run and is in metrics.jsonl, and the 1B model's checkpoint
  (13 GB of fp32 weights and Adam states, each file checksummed) and its 4.4 GB export are
  not paid for on a GPU lease. Without a checkpoint save (an adapter's checkpoint is small and
  not stopped at) the run ends normally and the record is written at exit.

The record (JSON): peak_allocated_mb (max over the whole run), segments_mb (each phase
segment's peak, in order), peak_reserved_mb (the allocator's, over the whole run),
peak_rss_mb (ru_maxrss), stopped ("checkpoint" or "exit"), seconds, and modules: the
top-level modules imported (the kit's import audit).
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

T0 = time.perf_counter()

# as a script (python bench/gpu_row.py, under torchrun too) the tree is not on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastchat_data.options import UsageError, entry_point, option, parse  # noqa: E402 - after T0

del sys.path[0]  # the path as Python set it: main gives the recipe's folder this one's place


@dataclass
class GPURowOptions:
    record: str = option(help="the JSON record of the run's peak memory, written at its end")
    stop_at_checkpoint: bool = option(
        False, "end the run (status 0) at its first checkpoint save, the record written"
    )


@entry_point
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    opts = parse(GPURowOptions, argv[:cut], prog="python bench/gpu_row.py", description=__doc__)
    if cut + 1 >= len(argv):
        raise UsageError(
            "no recipe: gpu_row.py --record FILE [--stop_at_checkpoint] -- SCRIPT ARGS"
        )
    script, args = argv[cut + 1], argv[cut + 2 :]

    import torch

    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    segments: list[float] = []  # max_memory_allocated of each phase, MiB
    reserved: list[float] = []  # max_memory_reserved likewise
    done = []

    def fold(device=None) -> None:
        if cuda:
            segments.append(round(torch.cuda.max_memory_allocated(device) / 2**20, 1))
            reserved.append(round(torch.cuda.max_memory_reserved(device) / 2**20, 1))

    original_reset = torch.cuda.reset_peak_memory_stats

    def reset_peak_memory_stats(device=None):
        fold(device)
        return original_reset(device)

    torch.cuda.reset_peak_memory_stats = reset_peak_memory_stats
    torch.cuda.memory.reset_peak_memory_stats = reset_peak_memory_stats

    def write_record(stopped: str) -> None:
        if done or rank != 0:
            return
        done.append(True)
        fold()  # the phase still open
        record = {
            "peak_allocated_mb": max(segments) if cuda else None,
            "segments_mb": segments,
            "peak_reserved_mb": max(reserved) if cuda else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "stopped": stopped,
            "seconds": round(time.perf_counter() - T0, 2),
            "modules": sorted({m.split(".")[0] for m in list(sys.modules) if m}),
        }
        Path(opts.record).write_text(json.dumps(record))

    def stop_here(*_a, **_k):
        write_record("checkpoint")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    if opts.stop_at_checkpoint:
        import torch.distributed.checkpoint as dcp

        dcp.save = stop_here
        if any(a.startswith("zero") for a in args):  # only DeepSpeed runs import DeepSpeed here
            try:
                from deepspeed.runtime.engine import DeepSpeedEngine

                DeepSpeedEngine.save_checkpoint = stop_here
            except ImportError:
                pass
    atexit.register(write_record, "exit")

    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)  # this folder's place: as `python SCRIPT`
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
