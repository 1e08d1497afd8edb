"""The job's processes: who this rank is, its device, its place in the mesh, and the few
collectives the loop needs (sums in one all-reduce, a barrier, rank 0 first)."""

from __future__ import annotations

import atexit
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fastchat_data.options import InputError

from . import parallel
from .config import ConfigError
from .parallel import ParallelDims, Strategy


@dataclass
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device
    strategy: Strategy
    dims: ParallelDims
    sp_group: object = None  # the ranks sharing this rank's rows (sequence parallel), or None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: which share of each global batch it trains on."""
        return self.dims.dp_rank(self.rank)

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def sp_rank(self) -> int:
        """Which shard of each row this rank holds (0 without sequence parallelism)."""
        return self.dims.sp_rank(self.rank)

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed and self.size > 1:
            dist.barrier()

    def all_sum(self, value: float | int) -> float:
        return self.all_sums([value])[0]

    def all_sums(self, values: list[float | int]) -> list:
        """Each value summed over the ranks, in one all-reduce."""
        if self.size == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def main_first(self, fn):
        """fn() on rank 0 while the others wait; all ranks learn whether it failed, so bad
        input stops every rank together with rank 0's message (instead of the others dying
        on a barrier whose peer has gone)."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except InputError as e:
                error = e
        if self.all_sum(error is not None) > 0:
            raise error or ConfigError("rank 0 stopped on an error (it printed the message)")
        return result

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` (picklable, small: lists of names and checksums), on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def resolve_strategy(name: str, size: int) -> Strategy:
    """`auto`: one process trains alone (single), several share with DDP. A strategy runs as
    what it says at any size (FSDP2 on one process is FSDP2 over a one-rank mesh)."""
    if name == "auto":
        return parallel.SINGLE if size == 1 else parallel.DDP
    strategy = parallel.get(name)
    if not strategy.multi_process and size > 1:
        able = ", ".join(s.name for s in parallel.STRATEGIES.values() if s.multi_process)
        raise ConfigError(f"strategy {name} runs one process, not {size}; use {able}")
    return strategy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world(strategy_name: str, sp: int = 1) -> World:
    """Join the process group the launcher set up (torchrun's or DeepSpeed's environment). A
    strategy that runs on a process group gets one even as a single process started without
    a launcher (a one-rank group on a free local port)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ:
        if "WORLD_SIZE" not in os.environ:  # accelerate's simple launcher: one process only
            raise ConfigError(
                "accelerate launch asked for several processes (--num_processes) but started "
                "one: on CPU add --multi_gpu (accelerate launch --multi_gpu --num_processes N), "
                "or use python -m launch.train --ngpu N"
            )
    strategy = resolve_strategy(strategy_name, size)
    try:
        dims = ParallelDims(size, sp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cuda = torch.cuda.is_available()
    if cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"{size} processes per node but only {torch.cuda.device_count()} GPUs on this node"
        )
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if strategy.multi_process and not dist.is_initialized():
        # started as a plain process: a group of one. RANK, not MASTER_ADDR, says so: a shell
        # that exports MASTER_ADDR for its cluster still starts plain processes
        if "RANK" not in os.environ:
            os.environ.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()),
                RANK="0",
                LOCAL_RANK="0",
                WORLD_SIZE="1",
            )
        backend = "nccl" if cuda else "gloo"
        if strategy.engine == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, verbose=False)
            if not cuda:
                atexit.register(remove_shm_buffer, local_rank)
        else:
            dist.init_process_group(backend, device_id=device if cuda else None)
    return World(rank, local_rank, size, device, strategy, dims, sp_group(dims, rank))


def sp_group(dims: ParallelDims, rank: int):
    """This rank's sequence-parallel group: consecutive ranks (ParallelDims.dp_rank). Every
    rank creates every group, as torch.distributed.new_group requires."""
    if dims.sp == 1:
        return None
    mine = None
    for first in range(0, dims.world, dims.sp):
        group = dist.new_group(list(range(first, first + dims.sp)))
        if first <= rank < first + dims.sp:
            mine = group
    return mine


def remove_shm_buffer(local_rank: int) -> None:
    """DeepSpeed's CPU all-reduce keeps a ~70 MB buffer per rank in /dev/shm and never removes
    it: every CPU run would leave its buffers in memory (tmpfs) until reboot."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{local_rank}"):
        path.unlink(missing_ok=True)


# How long a rank lets go of the GIL after leaving its process group (see shutdown).
GLOO_DRAIN_S = 0.05


def shutdown(world: World | None = None) -> None:
    """Leave the process group (every rank together).

    Then let go of the GIL for a moment. A gloo worker thread destroys each collective's work
    once it has run, and when that work holds the last reference to a tensor Python made, the
    destructor takes the GIL. If this thread, holding the GIL, meanwhile drops the last
    reference to the group (DDP's reducer going with the run), the group's destructor joins
    that worker, which waits for the GIL: a rank that finished and exported hangs forever
    (seen here: a DDP run's rank stuck in ~ProcessGroupGloo -> thread::join while its worker
    waited in ~AsyncAllreduceWork -> decref; pytorch/pytorch#56297). The sleep releases the
    GIL, so a worker still destroying a work finishes before anything drops the group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(GLOO_DRAIN_S)
