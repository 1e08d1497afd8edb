"""How processes share the work: the strategy registry and the device mesh's dimensions.

Every strategy is declared once, here, as a frozen `Strategy`: which engine drives it, which
launcher starts it, what it shards and offloads, how its checkpoints are written, and what it
supports. The config, the engines, the loader, the planner, the launcher, the benchmarks and
the tests read these attributes; nothing else compares a strategy's name. A new strategy is
one `register(Strategy(...))` call.

`ParallelDims` names the mesh's dimensions (torchtitan's idea): data parallel (dp) and
sequence parallel (sp, --sequence_parallel_size: recipes/core/sequence_parallel.py). Batches
are dealt, and losses normalised, over the data-parallel group: `dp_rank` / `dp_size`, kept
apart from the global rank. Model states are sharded (FSDP2, ZeRO) and gradients reduced over
all ranks, sp included: the ranks of one sp group hold different tokens, so for the weights
they are data-parallel ranks like any other (DeepSpeed ALST's choice, torchtitan's
dp_shard_cp), and sp costs no more memory per rank for model states than dp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class UnknownStrategy(ValueError):
    pass


@dataclass(frozen=True)
class Strategy:
    """One way to share a model across processes."""

    name: str
    description: str
    engine: Literal["torch", "deepspeed"]
    # what each data-parallel rank keeps a 1/N share of (the rest it holds whole)
    shards_params: bool = False
    shards_grads: bool = False
    shards_optimizer: bool = False
    # FSDP2: free a layer's gathered parameters after its forward (False: keep them to backward)
    reshard_after_forward: bool = True
    # parameters, gradients and optimizer states live in host memory between uses
    offload: bool = False
    zero_stage: int | None = None  # DeepSpeed's ZeRO stage
    multi_process: bool = True  # False: exactly one process
    # the model is built empty and each rank reads only its own share of the weights
    sharded_load: bool = False
    # what it can train and run
    adapters: bool = True  # LoRA on a full-precision base
    quantized_base: bool = False  # an adapter on a 4/8-bit bitsandbytes base
    prompt_learning: bool = False  # prompt tuning / P-tuning adapters
    compiles: bool = True  # --compile (torch.compile per decoder layer)
    # FastChat's / HF Trainer's --fsdp words that mean this strategy (auto_wrap aside)
    fastchat_fsdp: frozenset[str] = frozenset()
    # the planner's preference among strategies that fit: less communication first
    cost_rank: int = 0

    @property
    def launcher(self) -> Literal["torchrun", "deepspeed"]:
        """What starts its processes: DeepSpeed's launcher for DeepSpeed, else torchrun."""
        return "deepspeed" if self.engine == "deepspeed" else "torchrun"

    @property
    def fsdp(self) -> bool:
        """Driven by torch's FSDP2 (fully_shard)."""
        return self.engine == "torch" and self.shards_params

    @property
    def replicated(self) -> bool:
        """Every rank holds the whole model (parameters not sharded)."""
        return not self.shards_params

    @property
    def ds_config_name(self) -> str | None:
        """Its DeepSpeed JSON in ds_configs/."""
        return f"{self.name}.json" if self.engine == "deepspeed" else None

    @property
    def checkpoint_format(self) -> Literal["dcp", "deepspeed"]:
        return "deepspeed" if self.engine == "deepspeed" else "dcp"


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    STRATEGIES[strategy.name] = strategy
    return strategy


def get(name: str | Strategy) -> Strategy:
    """The registered strategy `name`; an unknown name is an UnknownStrategy naming the choices."""
    if isinstance(name, Strategy):
        return name
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownStrategy(f"strategy {name!r} is not one of {', '.join(STRATEGIES)}") from None


def names() -> list[str]:
    return list(STRATEGIES)


def by_cost() -> list[Strategy]:
    """Cheapest first: less communication, fewer moving parts, no host round trips."""
    return sorted(STRATEGIES.values(), key=lambda s: s.cost_rank)


def from_fastchat_fsdp(words: set[str]) -> Strategy | None:
    """The strategy FastChat's `--fsdp` words name (auto_wrap carries no meaning here)."""
    wanted = frozenset(words - {"auto_wrap"})
    found = (s for s in STRATEGIES.values() if s.fastchat_fsdp and s.fastchat_fsdp == wanted)
    return next(found, None)


def from_zero_config(stage: int, offload_params: bool) -> Strategy | None:
    """The strategy a DeepSpeed JSON describes (stage 1 is run as stage 2)."""
    stage = 2 if stage == 1 else stage
    return next(
        (
            s
            for s in STRATEGIES.values()
            if s.zero_stage == stage and (s.offload == offload_params or stage == 2)
        ),
        None,
    )


SINGLE = register(
    Strategy(
        "single",
        "one process, the whole model",
        "torch",
        multi_process=False,
        quantized_base=True,
        prompt_learning=True,
        cost_rank=0,
    )
)
DDP = register(
    Strategy(
        "ddp",
        "a full copy per process, gradients all-reduced (DistributedDataParallel)",
        "torch",
        quantized_base=True,
        prompt_learning=True,
        fastchat_fsdp=frozenset({"no_shard"}),
        cost_rank=1,
    )
)
ZERO2 = register(
    Strategy(
        "zero2",
        "DeepSpeed ZeRO-2: gradients and optimizer states sharded",
        "deepspeed",
        shards_grads=True,
        shards_optimizer=True,
        zero_stage=2,
        cost_rank=2,
    )
)


def _fsdp2(name: str, description: str, fastchat_words: set[str], **traits) -> Strategy:
    """An FSDP2 strategy: torch shards parameters, gradients and optimizer states, each rank
    loads only its share, and it trains full fine-tunes only (no adapters on a sharded base).
    Said once here, so each FSDP2 entry below names only what sets it apart."""
    return register(
        Strategy(
            name,
            description,
            "torch",
            shards_params=True,
            shards_grads=True,
            shards_optimizer=True,
            sharded_load=True,
            adapters=False,
            fastchat_fsdp=frozenset(fastchat_words),
            **traits,
        )
    )


def _zero3(name: str, description: str, **traits) -> Strategy:
    """A DeepSpeed ZeRO-3 strategy: parameters, gradients and optimizer states sharded, each
    rank loads only its share, and no --compile (its hooks gather parameters that a per-layer
    torch.compile would trace through)."""
    return register(
        Strategy(
            name,
            description,
            "deepspeed",
            shards_params=True,
            shards_grads=True,
            shards_optimizer=True,
            zero_stage=3,
            sharded_load=True,
            compiles=False,
            **traits,
        )
    )


FSDP_GRAD_OP = _fsdp2(
    "fsdp_grad_op",
    "FSDP2 without resharding after forward (FastChat's shard_grad_op)",
    {"shard_grad_op"},
    reshard_after_forward=False,
    cost_rank=3,
)
FSDP = _fsdp2(
    "fsdp",
    "FSDP2 fully_shard per decoder layer, parameters resharded after forward",
    {"full_shard"},
    cost_rank=4,
)
ZERO3 = _zero3(
    "zero3", "DeepSpeed ZeRO-3: parameters, gradients and optimizer states sharded", cost_rank=5
)
FSDP_OFFLOAD = _fsdp2(
    "fsdp_offload",
    "FSDP2 with parameters, gradients and AdamW on the CPU (CPUOffloadPolicy)",
    {"full_shard", "offload"},
    offload=True,
    cost_rank=6,
)
ZERO3_OFFLOAD = _zero3(
    "zero3_offload",
    "DeepSpeed ZeRO-3 with parameters and optimizer states on the CPU",
    offload=True,
    cost_rank=7,
)


@dataclass(frozen=True)
class ParallelDims:
    """The mesh's named dimensions: `world = dp x sp`. Data parallel (dp) splits the global
    batch; sequence parallel (sp) splits each sequence over `sp` ranks, which then share one
    data-parallel rank."""

    world: int
    sp: int = 1

    def __post_init__(self):
        if self.world < 1 or self.sp < 1 or self.world % self.sp:
            raise ValueError(
                f"{self.world} processes cannot be split into groups of {self.sp} "
                "(sequence_parallel_size must divide the number of processes)"
            )

    @property
    def dp(self) -> int:
        return self.world // self.sp

    def dp_rank(self, rank: int) -> int:
        """Consecutive ranks share a sequence (sp), so they sit on one node when sp <= GPUs per
        node and their all-to-alls stay on the fast links."""
        return rank // self.sp

    def sp_rank(self, rank: int) -> int:
        return rank % self.sp
