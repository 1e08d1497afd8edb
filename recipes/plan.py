"""Will it fit? Per-rank GPU memory and per-node CPU memory of every training strategy, from a
model's config.json alone (no weights).

    python -m recipes.plan --model llama-2-70b/config.json --ngpu 8 --bf16 --gradient_checkpointing
    python -m recipes.plan --model llama-2-7b --ngpu 8 --bf16 --gradient_checkpointing \\
        --sequence_parallel_size 4 --model_max_length auto      # the longest row that fits
    python -m recipes.plan --model DIR --ngpu 2 --device cpu --json     # peak RSS of a CPU run

Method (bytes per rank; N = ngpu x nnodes ranks, n = ngpu ranks per node, Psi parameters):
- Strategies are recipes/core/parallel.py's registry: what a strategy shards, offloads and
  loads, its engine and its ZeRO stage decide its row, never its name; rows run cheapest
  first (Strategy.cost_rank: less communication, fewer moving parts, no host round trips).
- Parameters are counted exactly from the config (embeddings, q/k/v/o with GQA, SwiGLU MLP,
  RMSNorms, untied head), as LlamaForCausalLM(config).num_parameters() counts them.
- Model states. DeepSpeed with bf16 keeps 16-bit params (2) and grads (2) plus K = 12 bytes of
  fp32 master copy, momentum and variance: (2 + 2 + K) Psi, sharded as in the ZeRO paper
  (stage 2: grads and optimizer / N; stage 3: all three / N). camelid's torch engines (single,
  DDP, FSDP2) keep fp32 params (4), fp32 grads (4) and Adam (8), the same 16 Psi, with bf16 used
  for compute only (autocast, FSDP2's MixedPrecisionPolicy). Without --bf16: 4 + 4 + 8 and no
  master copy, except that DeepSpeed's ZeRO optimizer always clones an fp32 partition (+4/N).
- Activations per decoder layer (Korthikanti et al. 2022, "Reducing Activation Recomputation
  in Large Transformer Models", sec. 4.1: 34sbh + 5as^2b for GPT with 16-bit activations and
  dropout), redone for a Llama layer the way autograd saves it (tested tensor by tensor): two
  RMSNorms, each keeping its input in fp32 plus the normalised and the scaled output
  ((4 + 2p) sbh each); q, and k, v at GQA size (expanded to q_dim when padding needs a mask);
  the fused attention's output, already in o_proj's layout; SwiGLU's gate, SiLU(gate), up and
  their product (4p sb*I); no dropout, no s^2 term (flash / memory-efficient attention). With
  activation checkpointing (HF's, per decoder layer) each layer keeps its input (p sbh, as
  Korthikanti's full recomputation) and one layer is live again during its recomputation.
  Logits: HF's loss upcasts them to fp32, p + 4 + 4 bytes per row x vocab (logits, fp32
  log-probs, their gradient), over `--loss_chunk_size` rows at a time (camelid's chunked loss).
- Sequence parallelism (Ulysses, --sequence_parallel_size sp): each sequence is split over sp
  ranks, s/sp tokens each (rounded up: the recipe pads a row to a multiple of sp). Everything
  outside attention runs on the local tokens, so every activation above, the checkpointed
  layer inputs, RoPE's cos/sin and the logits rows are those of s/sp tokens. Attention runs on
  the whole sequence for H/sp heads (and kv/sp key/value heads, never repeated: the rows carry
  no padding mask) between two all-to-alls (recipes/core/sequence_parallel.py): the kernel's
  saved q, k, v, output and logsumexp hold s x H/sp heads, the same bytes as s/sp x H.
  One tensor more per layer: the kernel keeps its own output (head-sharded) for backward while
  o_proj keeps the output received back in the sequence layout, p (s/sp) b q_dim (without sp
  they are one tensor). All-to-all buffers ("a2a"): each exchange makes its input contiguous in
  the collective's layout (a send buffer) and receives into a new tensor, which is the next
  op's saved input (counted above). Layers run one at a time, so one layer's buffers are live:
  q, k and v go out together (the kernel needs all three; in backward the kernel returns dq,
  dk, dv together and they go back together), the attention output alone and later (q_dim,
  less than q + k + v), so the peak is p (s/sp) b (q_dim + 2 kv_dim), in the activation dtype.
  Model states are sharded over all N ranks as without sp (the sp ranks are data-parallel
  ranks for FSDP/ZeRO sharding: DeepSpeed's ALST, torchtitan's dp_shard_cp); the data-parallel
  size (batches dealt) becomes N / sp. sp must divide N, the attention heads and the key/value
  heads.
- Buffers: DDP's gradient buckets (a second copy of the grads: gradient_as_bucket_view is off);
  autocast's bf16 weight copies (2 Psi) under single/DDP; FSDP2: the root unit (embeddings,
  head, final norm; its grads are reduced last) and two decoder layers unsharded (current and
  prefetched), one layer's unsharded grads and, with bf16, their fp32 copy to reduce-scatter;
  FSDP2 without resharding after forward (fsdp_grad_op): every layer unsharded from forward to
  backward; ZeRO: the reduce buckets (reduce_bucket_size elements, twice under stage 2 with
  overlap_comm), stage 3's prefetch bucket and gathered params (kept for reuse up to
  stage3_max_live_parameters; frozen adapter bases are gathered the same way), the fp32 grad
  partition (stage 2: a copy, 4/N; stage 3: accumulated in fp32, 2/N over the paper, as
  DeepSpeed's own estimator counts 18 Psi/N); a CUDA context per GPU (1 GB). "auto" sizes
  are HF's: hidden^2, 0.9 hidden^2. On a CPU, torch.empty'd buckets count once touched.
- Host memory per node: each process's runtime, offloaded states (strategies that offload),
  the loading phase (sharded streaming: an FSDP2 rank reads its own rows, a ZeRO-3 rank its
  partition, straight into its shard; DDP and ZeRO-2 one fp32 copy per rank, through the
  mapped checkpoint file) and the export (rank 0 gathers one full copy in the export dtype).
- With --device cpu (a CPU run) every component is host memory: each process's peak RSS per
  phase is predicted, with the runtime measured (imports, gloo, one tiny step; Python API:
  also the run's tokenizer and training set).

Fits: a row fits when each GPU's total is within --gpu_memory and, where --cpu_memory is given,
the node's host peak (training, loading, export) is within it (with --device cpu only the host
counts); a row that does not fit names the limit that fails. "Cheapest that fits": the first
row that fits, rows being in order of communication, least first.

--model_max_length auto: for each strategy, the longest row (tokens, at the given batch and sp)
that fits, found by bisection over the length (a multiple of sp; memory never decreases with
the length: activations and logits grow with it, everything else is constant), up to 2^30
tokens; the row shows the memory at that length. It assumes what the rest of the plan does
(attention without an s^2 term, i.e. flash / memory-efficient kernels; the loss chunked as
given) and nothing of the model's position range: past max_position_embeddings a model needs
RoPE scaling, which the table notes.

Errors (a missing or malformed config.json, a config that is not Llama-shaped, an option out
of range, an unknown strategy) are one line on stderr naming the option or file, exit status
2. When the reader of stdout goes away (`... --json | head -1`) the planner stops quietly with
exit status 141, as a tool killed by SIGPIPE (cat, grep) does.

`plan(...)` returns the rows; `fits(row, gpu_memory)` is the launcher's pre-flight check; bad
input raises PlanError (a ValueError) with the same one-line messages.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from fastchat_data.options import UsageError, build_parser, option, parse
from recipes.core import parallel
from recipes.core.parallel import Strategy

GB = 1e9  # the ZeRO paper's and the GPU vendors' gigabyte
MIB = 2**20
DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"

ADAM_K = 12  # fp32 master + momentum + variance, bytes per parameter (ZeRO paper, sec. 3.1)
# CUDA context, cuBLAS workspace and NCCL buffers per GPU process (typical for CUDA 12)
CUDA_CONTEXT = 1.0 * GB
# DeepSpeed's defaults where its JSON is silent (deepspeed.runtime.zero.config)
DS_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
    "overlap_comm": False,
}
# Llama-2's published config.json values (meta-llama/Llama-2-*-hf), for --model llama-2-7b:
# what the sizes share, then one row per size (a table: the sizes are the only difference)
_LLAMA2 = dict(
    vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="float16"
)
_LLAMA2_SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
_LLAMA2_SIZES = {
    "llama-2-7b": (4096, 11008, 32, 32, 32),
    "llama-2-13b": (5120, 13824, 40, 40, 40),
    "llama-2-70b": (8192, 28672, 80, 64, 8),
}
PRESETS = {
    name: dict(_LLAMA2, **dict(zip(_LLAMA2_SIZE_KEYS, sizes, strict=True)))
    for name, sizes in _LLAMA2_SIZES.items()
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# per rank: model states, what backward needs, sequence-parallel exchanges, the rest
COMPONENTS = ("params", "grads", "optim", "activations", "logits", "a2a", "buffers", "runtime")

# what a config.json must say, and what the planner cannot count
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
LLAMA_TYPES = ("llama", "mistral")  # decoders with Llama's parameter layout
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
# bounds beyond which a value is a typo, not a machine or a model
MAX_DIM = 2**24  # any one size in a config.json
CONFIG_MAX_BYTES = 16 * MIB  # a config.json is a few KB
MAX_TOKENS = 2**30  # tokens per row (also where --model_max_length auto stops looking)
MAX_BYTES = 1e15  # 1 PB: memory of a GPU or of a node
MAX_GPUS_PER_NODE = 1024
MAX_NODES = 100_000
MAX_BATCH = 2**20
MAX_LORA_R = 2**16
EXIT_ERROR = 2  # argparse's status for a bad command line
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what the shell reports for a tool killed by SIGPIPE


class PlanError(UsageError):
    """Bad input to the planner: one line naming the option or the file and what is wrong."""


def _short(value, width: int = 60) -> str:
    """repr(value), cut to `width` characters: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _kind(value) -> str:
    """A JSON value's kind, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {_short(value)}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    return "a list" if isinstance(value, list) else "an object"


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    file_bytes: int = 4  # per parameter in the checkpoint files (config's torch_dtype)
    positions: int | None = None  # max_position_embeddings, where the config says

    @classmethod
    def from_config(cls, config: dict | str | Path) -> Shape:
        """A Llama-family config.json (a dict, the file, or the folder holding it), or one of
        PRESETS; PlanError naming the file and the problem when it is not one."""
        if isinstance(config, str) and config in PRESETS:
            return cls.from_dict(PRESETS[config], config)
        if isinstance(config, dict):
            return cls.from_dict(config, "config")
        if isinstance(config, (str, Path)):
            return cls.from_dict(*read_config(config))
        raise PlanError(f"model: {config!r} is not a config dict, a config.json or a model folder")

    @classmethod
    def from_dict(cls, config: dict, where: str) -> Shape:
        c = config
        if config.get("text_config") is not None:  # multimodal wrappers nest the language model
            c, where = config["text_config"], f"{where} (text_config)"
            if not isinstance(c, dict):
                raise PlanError(f"{where}: is {_kind(c)}, not an object of config keys")
        kind = c.get("model_type")
        if kind is not None and kind not in LLAMA_TYPES:
            raise PlanError(
                f"{where}: model_type {_short(kind)} is not Llama-shaped (the planner counts "
                f"{' and '.join(LLAMA_TYPES)} decoders)"
            )
        moe = [k for k in MOE_KEYS if c.get(k)]
        if moe:
            raise PlanError(
                f"{where}: {moe[0]} says a mixture of experts; the planner "
                "counts dense Llama layers only"
            )
        missing = [k for k in REQUIRED_KEYS if c.get(k) is None]
        if missing:
            raise PlanError(
                f"{where}: not a Llama-shaped config: no {', '.join(missing)} (it needs "
                f"{', '.join(REQUIRED_KEYS)})"
            )

        def size(key: str):
            v = c.get(key)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM
            ):
                raise PlanError(
                    f"{where}: {key} is {_kind(v)}; it must be a whole number from 1 to {MAX_DIM:,}"
                )
            return v

        heads = size("num_attention_heads")
        kv_heads = size("num_key_value_heads") or heads
        if heads % kv_heads:
            raise PlanError(
                f"{where}: num_attention_heads {heads} is not a multiple of "
                f"num_key_value_heads {kv_heads}"
            )
        hidden = size("hidden_size")
        head_dim = size("head_dim") or hidden // heads
        if not head_dim:
            raise PlanError(
                f"{where}: hidden_size {hidden} is smaller than num_attention_heads "
                f"{heads} (no head_dim)"
            )
        dtype = c.get("torch_dtype") or c.get("dtype")
        return cls(
            vocab=size("vocab_size"),
            hidden=hidden,
            intermediate=size("intermediate_size"),
            layers=size("num_hidden_layers"),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            tied=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias")),
            mlp_bias=bool(c.get("mlp_bias")),
            file_bytes=DTYPE_BYTES.get(dtype, 4) if isinstance(dtype, str) else 4,
            positions=size("max_position_embeddings"),
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's linear layers."""
        h, i = self.hidden, self.intermediate
        return [
            (h, self.q_dim),
            (h, self.kv_dim),
            (h, self.kv_dim),
            (self.q_dim, h),
            (h, i),
            (h, i),
            (i, h),
        ]

    @property
    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        n = sum(a * b for a, b in self.linears()) + 2 * h  # + two RMSNorm weights
        if self.attention_bias:
            n += self.q_dim + 2 * self.kv_dim + h
        if self.mlp_bias:
            n += 2 * i + h
        return n

    @property
    def root_params(self) -> int:
        """Outside the decoder layers: embeddings, final norm, head (FSDP2's root unit)."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    @property
    def linear_params(self) -> int:
        """What 4-bit quantization packs: the decoder layers' linear weights."""
        return self.layers * sum(a * b for a, b in self.linears())


def read_config(model: str | Path) -> tuple[dict, str]:
    """The JSON object of a config.json (the file, or the folder holding it) and its path, or
    PlanError: what a file must be is checked before it is read (a regular file, at most 16
    MiB: never a device, a pipe or a folder), then that it is one JSON object."""
    presets = ", ".join(PRESETS)
    try:
        path = Path(model)
        if not path.exists():
            raise PlanError(
                f"--model {str(model)!r}: no such file or folder (a model folder with "
                f"config.json, its config.json, or one of {presets})"
            )
        if path.is_dir():
            path = path / "config.json"
            if not path.exists():
                raise PlanError(f"--model {str(model)!r}: no config.json in this folder")
        if path.is_dir():
            raise PlanError(f"{path}: a folder, not a config.json file")
        if not path.is_file():
            raise PlanError(f"{path}: not a regular file (a device, a pipe or a socket)")
        with path.open("rb") as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        if isinstance(e, PlanError):
            raise
        raise PlanError(
            f"--model {str(model)!r}: cannot read it ({getattr(e, 'strerror', None) or e})"
        ) from None
    if len(data) > CONFIG_MAX_BYTES:
        raise PlanError(f"{path}: over {CONFIG_MAX_BYTES // MIB} MiB, not a config.json")
    try:
        config = json.loads(data)
    except UnicodeDecodeError:
        raise PlanError(f"{path}: not text (a config.json is UTF-8 JSON)") from None
    except json.JSONDecodeError as e:
        raise PlanError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise PlanError(f"{path}: JSON nested too deeply to be a config.json") from None
    if not isinstance(config, dict):
        raise PlanError(f"{path}: holds {_kind(config)}, not an object of config keys")
    return config, str(path)


def lora_params(shape: Shape, r: int) -> int:
    """LoRA A (r x in) and B (out x r) on every linear layer of every decoder layer."""
    return shape.layers * sum(r * (a + b) for a, b in shape.linears())


def nf4_bytes_per_param(blocksize: int = 64, double_quant: bool = True) -> float:
    """4-bit weights plus quantization constants (QLoRA paper, sec. 3): one absmax per block,
    8-bit with double quantization plus one fp32 constant per 256 blocks, else fp32."""
    consts = (1 / blocksize + 4 / (blocksize * 256)) if double_quant else 4 / blocksize
    return 0.5 + consts


# ---------------------------------------------------------------- activations


def local_tokens(seq: int, sp: int = 1) -> int:
    """Tokens of a row on each of its sp ranks (the recipe pads a row to a multiple of sp)."""
    return -(-seq // sp)


def layer_activation_bytes(shape: Shape, seq: int, batch: int, *, p: int, sp: int = 1) -> float:
    """What autograd keeps for one Llama decoder layer's backward on one rank (see the module
    docstring); checked tensor by tensor against saved_tensors_hooks in tests/test_plan.py."""
    sb, h = local_tokens(seq, sp) * batch, shape.hidden
    # a padding mask makes HF repeat k and v; sequence parallelism drops the mask (padding is
    # at the end, where causal attention never reaches it) and attends with GQA's own k and v
    kv = shape.kv_dim if batch == 1 or sp > 1 else shape.q_dim
    # per RMSNorm: fp32 input, normalised and scaled outputs, fp32 1/rms per token
    norms = 2 * ((4 + 2 * p) * h + 4)
    # q, k, v, and the fused kernel's output (already in o_proj's layout), fp32 logsumexp
    attention = p * (2 * shape.q_dim + 2 * kv) + 4 * shape.heads
    if sp > 1:  # the kernel's output (head-sharded) and o_proj's input (sequence-sharded) differ
        attention += p * shape.q_dim
    mlp = 4 * p * shape.intermediate  # gate, SiLU(gate), up, their product
    return sb * (norms + attention + mlp)


def rope_bytes(shape: Shape, seq: int, batch: int, *, p: int, sp: int = 1) -> float:
    """cos and sin, computed once per forward and saved by every layer."""
    return 2 * p * local_tokens(seq, sp) * batch * shape.head_dim


def activation_bytes(
    shape: Shape, seq: int, batch: int, *, p: int, checkpointing: bool, sp: int = 1
) -> float:
    layer = layer_activation_bytes(shape, seq, batch, p=p, sp=sp)
    sb = local_tokens(seq, sp) * batch
    outside = sb * ((4 + 2 * p) * shape.hidden + 4) + rope_bytes(shape, seq, batch, p=p, sp=sp)
    if checkpointing:  # layer inputs kept, one layer's activations live again during recompute
        return shape.layers * p * sb * shape.hidden + layer + outside
    return shape.layers * layer + outside


def logits_bytes(
    shape: Shape, seq: int, batch: int, *, p: int, chunk: int = 0, sp: int = 1
) -> float:
    """Logits (compute dtype), their fp32 log-softmax and its gradient; camelid's chunked loss
    (recipes/core/loss.py) holds `chunk` rows of them at a time."""
    rows = batch * local_tokens(seq, sp)
    rows = rows if chunk <= 0 else min(rows, chunk)
    return rows * shape.vocab * (p + 4 + 4)


def all_to_all_bytes(shape: Shape, seq: int, batch: int, *, p: int, sp: int) -> float:
    """Ulysses' send buffers of one layer's q, k and v (the attention output's, q_dim, goes
    alone and later); none without sequence parallelism. See the module docstring."""
    if sp <= 1:
        return 0.0
    return p * local_tokens(seq, sp) * batch * (shape.q_dim + 2 * shape.kv_dim)


# ---------------------------------------------------------------- model states (ZeRO paper)


def model_states_bytes(psi: float, stage: int, n: int, *, k: float = ADAM_K) -> dict[str, float]:
    """Mixed-precision model states per rank, ZeRO paper sec. 5 / Figure 1: 2 Psi params, 2 Psi
    grads, K Psi optimizer; stage 1 shards the optimizer, 2 also grads, 3 also params."""
    return {
        "params": 2 * psi / (n if stage >= 3 else 1),
        "grads": 2 * psi / (n if stage >= 2 else 1),
        "optim": k * psi / (n if stage >= 1 else 1),
    }


# ---------------------------------------------------------------- the plan


@dataclass
class Setup:
    ngpu: int = 1
    nnodes: int = 1
    seq: int = 2048
    batch: int = 1
    bf16: bool = False
    checkpointing: bool = False
    device: str = "gpu"  # "cpu": predict each process's peak RSS of a CPU run
    peft: str | None = None
    lora_r: int = 64
    loss_chunk: int = 512  # --loss_chunk_size (0: transformers' loss, all logits at once)
    # "streaming": FSDP2 / ZeRO-3 ranks read only their shards, DDP / ZeRO-2 one copy each;
    # "full": every rank from_pretrained()s the whole model (camelid before sharded loading)
    loading: str = "streaming"
    runtime: float = 0.0  # bytes per process before any model (python, torch, libraries)
    cpu_runtime: float = 3.0 * GB  # per GPU process's host memory (CUDA, libraries, pinned pools)
    sp: int = 1  # --sequence_parallel_size: ranks sharing each sequence (Ulysses)

    @property
    def ranks(self) -> int:
        return self.ngpu * self.nnodes

    def check(self, shape: Shape) -> Setup:
        """PlanError naming the option when a value is out of range (the command line's flags
        name them, also for the Python API: `seq` is --model_max_length)."""
        for flag, value, low, high in (
            ("--ngpu", self.ngpu, 1, MAX_GPUS_PER_NODE),
            ("--nnodes", self.nnodes, 1, MAX_NODES),
            ("--model_max_length", self.seq, 1, MAX_TOKENS),
            ("--per_device_train_batch_size", self.batch, 1, MAX_BATCH),
            ("--lora_r", self.lora_r, 1, MAX_LORA_R),
            ("--loss_chunk_size", self.loss_chunk, 0, MAX_TOKENS),
        ):
            whole_number(flag, value, low, high=high)
        whole_number("--sequence_parallel_size", self.sp, 1, high=self.ranks)
        for flag, value, choices in (
            ("--device", self.device, ("gpu", "cpu")),
            ("--loading", self.loading, ("streaming", "full")),
            ("--peft", self.peft, (None, "lora", "qlora")),
        ):
            if value not in choices:
                names = ", ".join(str(c) for c in choices if c is not None)
                raise PlanError(f"{flag} {_short(value)}: not one of {names}")
        for flag, value in (("runtime", self.runtime), ("cpu_runtime", self.cpu_runtime)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value <= MAX_BYTES
            ):
                raise PlanError(f"{flag} {_short(value)}: must be bytes from 0 to 1 PB")
        sp = self.sp
        if self.ranks % sp:
            raise PlanError(
                f"--sequence_parallel_size {sp} does not divide the {self.ranks} ranks "
                f"(--ngpu {self.ngpu} x --nnodes {self.nnodes})"
            )
        for what, heads in (("attention heads", shape.heads), ("key/value heads", shape.kv_heads)):
            if heads % sp:
                raise PlanError(
                    f"--sequence_parallel_size {sp} does not divide the model's {heads} "
                    f"{what} (each rank attends with 1/{sp} of them)"
                )
        return self


def whole_number(flag: str, value, low: int, *, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PlanError(f"{flag} {_short(value)}: must be a whole number from {low:,} to {high:,}")
    return value


def memory_size(flag: str, value) -> float | None:
    """A memory budget in bytes: positive, finite, at most 1 PB (None: no budget)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise PlanError(f"{flag} {value!r}: not a size in bytes")
    if not 0 < value <= MAX_BYTES:
        raise PlanError(
            f"{flag}: {value / GB:,.6g} GB is not a memory size (more than 0, at most 1 PB)"
        )
    return float(value)


@dataclass
class Row:
    strategy: str
    ranks: int
    per_rank: dict[str, float]  # bytes on each GPU (or each process's RSS with device cpu)
    activations_no_ckpt: float
    activations_ckpt: float
    per_node_cpu: dict[str, float]  # host bytes per node: steady state, loading, export
    load_model_copies_per_node: float
    notes: list[str] = field(default_factory=list)
    # device cpu: each process's predicted peak RSS per phase (export: rank 0, which gathers)
    process_phases: dict[str, float] = field(default_factory=dict)
    process_export_other: float = 0.0
    fits: bool | None = None  # None: no memory budget to judge by
    fails: list[str] = field(default_factory=list)  # the limits it exceeds: "gpu", "host"
    cheapest: bool = False
    seq: int = 0  # tokens per row this row is planned at
    sp: int = 1
    data_parallel: int = 1  # ranks / sp: the ranks batches are dealt to
    max_length: int | None = None  # --model_max_length auto: the longest that fits (None: none)

    @property
    def total(self) -> float:
        return sum(self.per_rank.values())

    @property
    def cpu_peak(self) -> float:
        return max(self.per_node_cpu.values())


def ds_zero_config(strategy: Strategy | str, shape: Shape) -> dict:
    """The bucket sizes of the strategy's DeepSpeed JSON; "auto" as HF's integration fills it."""
    from recipes.core.config import ZERO_AUTO_SIZES  # the engine's own fill rule

    z = _ds_json(parallel.get(strategy).ds_config_name)
    out = {}
    for key, default in DS_DEFAULTS.items():
        v = z.get(key, default)
        if v == "auto":
            v = ZERO_AUTO_SIZES[key](shape.hidden) if key in ZERO_AUTO_SIZES else default
        out[key] = v
    return out


_DS_JSON: dict[str, dict] = {}


def _ds_json(name: str) -> dict:
    """ds_configs/<name>'s zero_optimization, read once (the length search plans many rows)."""
    if name not in _DS_JSON:
        text = (DS_CONFIG_DIR / name).read_text()
        _DS_JSON[name] = json.loads(text).get("zero_optimization", {})
    return _DS_JSON[name]


def _buckets_gradients(st: Strategy) -> bool:
    """DDP: a replicated model over several processes all-reduces its grads through buckets."""
    return st.engine == "torch" and st.multi_process and not st.shards_grads


def plan_row(shape: Shape, strategy: Strategy | str, s: Setup) -> Row:
    st = parallel.get(strategy)
    N, n = s.ranks, s.ngpu
    if not st.multi_process:
        N = n = 1
    sp = s.sp if st.multi_process else 1
    cpu = s.device == "cpu"
    p = 2 if s.bf16 else 4  # compute dtype bytes
    psi = shape.params
    layer, root = shape.layer_params, shape.root_params
    deepspeed = st.engine == "deepspeed"
    act_ckpt = activation_bytes(shape, s.seq, s.batch, p=p, checkpointing=True, sp=sp)
    act_full = activation_bytes(shape, s.seq, s.batch, p=p, checkpointing=False, sp=sp)
    r = dict.fromkeys(COMPONENTS, 0.0)
    r["activations"] = act_ckpt if s.checkpointing else act_full
    r["logits"] = logits_bytes(shape, s.seq, s.batch, p=p, chunk=s.loss_chunk, sp=sp)
    r["a2a"] = all_to_all_bytes(shape, s.seq, s.batch, p=p, sp=sp)
    notes: list[str] = []
    offloaded = 0.0  # bytes per rank kept in host memory
    released = 0.0  # ZeRO-3's gathered params, partitioned again after each step

    def touched(elements: float) -> float:
        """A torch.empty'd bucket: on a GPU all of it, on a CPU only the pages written."""
        return min(elements, psi) if cpu else elements

    def gathered_params(ds: dict) -> float:
        """ZeRO-3's gathered parameters: kept for reuse (stage3_max_reuse_distance, 1e9 by
        default) up to stage3_max_live_parameters, and the prefetch bucket."""
        reuse = ds["stage3_max_reuse_distance"] >= ds["stage3_max_live_parameters"]
        live = min(ds["stage3_max_live_parameters"], psi if reuse else 2 * layer + root)
        return p * (live + min(ds["stage3_prefetch_bucket_size"], layer))

    if s.peft:
        # frozen base, replicated or sharded; adapter with fp32 weights, grads, Adam
        if s.peft == "qlora":
            base_b = nf4_bytes_per_param() * shape.linear_params + 2 * (psi - shape.linear_params)
        else:
            base_b = 2 * psi if s.bf16 else 4 * psi
        ad = lora_params(shape, s.lora_r)
        r["params"] = base_b / (N if st.shards_params else 1) + 4 * ad
        r["grads"] = 4 * ad
        r["optim"] = 8 * ad
        biggest = max(a * b for a, b in shape.linears())
        if s.peft == "qlora":
            r["buffers"] += 2 * biggest  # one weight dequantized to bf16 at a time
        if _buckets_gradients(st):
            r["buffers"] += 4 * ad  # DDP's buckets
        if deepspeed and st.zero_stage == 3:  # the frozen base is gathered like any parameter
            released = gathered_params(ds_zero_config(st, shape))
            r["buffers"] += released
        notes.append(f"adapter r={s.lora_r}: {ad / 1e6:.1f}M trainable")
        if st.offload and not cpu:
            offloaded = r["params"] + r["grads"] + r["optim"]
            r["params"] = r["grads"] = r["optim"] = 0.0
            notes.append("base partition and adapter states in host memory")
    elif deepspeed:
        stage = st.zero_stage
        ds = ds_zero_config(st, shape)
        if s.bf16:
            states = model_states_bytes(psi, stage, N)
        else:  # fp32 module; ZeRO still clones an fp32 partition: master 4 + Adam 8
            states = {k: v * 2 for k, v in model_states_bytes(psi, stage, N, k=6).items()}
        r.update(states)
        bucket = ds["reduce_bucket_size"] * (2 if stage == 2 and ds["overlap_comm"] else 1)
        r["buffers"] += touched(bucket) * p
        if stage < 3:  # the fp32 grad partition the optimizer steps on (a copy)
            r["buffers"] += 4 * psi / N
        elif s.bf16:  # stage 3 accumulates the grad partition in fp32: 2 bytes over the paper's
            r["buffers"] += 2 * psi / N
        if stage == 3:
            released = gathered_params(ds)
            r["buffers"] += released
        if st.offload and not cpu:  # param and grad partitions, optimizer: all on the host
            fp32_grads = 2 * psi / N if s.bf16 and stage == 3 else 0.0
            offloaded = r["params"] + r["grads"] + r["optim"] + fp32_grads
            r["buffers"] -= fp32_grads
            r["params"] = r["grads"] = r["optim"] = 0.0
            notes.append("params, grads, optimizer in host memory; the GPU holds gathered layers")
    elif st.shards_params:  # FSDP2
        r.update(params=4 * psi / N, grads=4 * psi / N, optim=8 * psi / N)
        gathered = 2 * layer if st.reshard_after_forward else shape.layers * layer
        # unsharded grads: the root's live through the whole backward (its reduce-scatter runs
        # last), one layer's at a time; with bf16 each is cast to fp32 to reduce-scatter
        grads = p * (root + layer) + (4 * max(root, layer) if p != 4 else 0)
        r["buffers"] += p * (root + gathered) + grads
        if not st.reshard_after_forward:
            notes.append("every layer stays unsharded between forward and backward")
        if st.offload and not cpu:  # on a CPU the states stay in the process
            offloaded = r["params"] + r["grads"] + r["optim"]
            r["params"] = r["grads"] = r["optim"] = 0.0
            notes.append("params, grads, optimizer in host memory (CPUOffloadPolicy)")
    else:  # a replicated torch model: one process, or DDP
        r.update(params=4 * psi, grads=4 * psi, optim=8 * psi)
        if s.bf16:
            r["buffers"] += 2 * psi  # autocast's bf16 weight copies, kept for backward
        if _buckets_gradients(st):
            r["buffers"] += 4 * psi  # gradient buckets: a second copy of the fp32 grads
    if cpu:
        r["runtime"] = s.runtime
        offloaded = 0.0  # on a CPU the "device" is the host: counted per process above
    elif s.device == "gpu":
        r["buffers"] += CUDA_CONTEXT

    # loading: sharded streaming (FSDP2 / ZeRO-3) vs one fp32 copy per rank
    streams = s.loading == "streaming" and st.sharded_load
    copies_per_node = n / N if streams else n
    # checkpoint pages a rank maps while loading (in its RSS; in the page cache once per node):
    # sharded loading reads its rows / partition with plain file reads (nothing mapped);
    # from_pretrained maps the whole file
    mapped = 0.0 if streams else shape.file_bytes * psi
    load_bytes = 4 * psi * copies_per_node + mapped  # shared pages count once per node
    # export: rank 0 gathers one full copy; DeepSpeed gathers in the module dtype
    export_dtype = p if deepspeed and s.bf16 else 4
    if s.peft:
        export_dtype, export_n = 4, lora_params(shape, s.lora_r)
    else:
        export_n = psi
    runtime_node = (s.runtime if cpu else s.cpu_runtime) * n
    steady = runtime_node + offloaded * n + (sum(r.values()) - r["runtime"]) * n * cpu
    per_node_cpu = {
        "train": steady,
        "load": runtime_node + load_bytes + offloaded * n,
        "export": steady + export_dtype * export_n,
    }
    row = Row(
        st.name,
        N,
        r,
        act_full,
        act_ckpt,
        per_node_cpu,
        copies_per_node,
        notes,
        seq=s.seq,
        sp=sp,
        data_parallel=N // sp,
    )
    if cpu:
        # load: until the model is in its training layout with its weights (the engine's
        # optimizer states come after, in the "setup" phase)
        load = r["runtime"] + 4 * psi * copies_per_node / n + mapped
        # after training: grads freed (set_to_none), persistent buffers stay (DDP's buckets,
        # ZeRO's buckets and grad partitions); FSDP frees its unsharded layers
        kept = r["buffers"] - released if _buckets_gradients(st) or deepspeed else 0.0
        after = r["runtime"] + r["params"] + r["optim"] + kept + (r["grads"] if deepspeed else 0.0)
        # rank 0: the gathered state dict (save_pretrained writes it without another copy:
        # measured by bench/memory_bench.py)
        gathered = export_dtype * export_n
        # a replicated model's state dict on a CPU: .cpu() returns the live tensors, no copy
        copied = 0.0 if st.replicated else gathered
        row.process_phases = {"load": load, "train": row.total, "export": after + copied}
        row.process_export_other = after
    return row


def why_not(st: Strategy, s: Setup) -> str | None:
    """Why `st` has no row for this setup (None: it has one)."""
    if s.peft == "qlora" and not st.quantized_base:
        return "does not train an adapter on a quantized base (--peft qlora)"
    if s.peft == "lora" and not st.adapters:
        return "does not train adapters (--peft lora)"
    if s.ranks > 1 and not st.multi_process:
        return f"runs one process, and --ngpu {s.ngpu} x --nnodes {s.nnodes} is {s.ranks}"
    return None


def limits_failed(
    row: Row, device: str, gpu_memory: float | None, *, cpu_memory: float | None
) -> list[str] | None:
    """The limits a row exceeds ("gpu", "host"; none: it fits), or None without any budget.
    With device cpu only the host counts: every component is host memory."""
    if device == "cpu":
        gpu_memory = None
    if gpu_memory is None and cpu_memory is None:
        return None
    fails = []
    if gpu_memory is not None and row.total > gpu_memory:
        fails.append("gpu")
    if cpu_memory is not None and row.cpu_peak > cpu_memory:
        fails.append("host")
    return fails


def fits(row: Row, gpu_memory: float, cpu_memory: float | None = None) -> bool:
    """The pre-flight check: every rank's peak under `gpu_memory` bytes (and the node's host
    memory under `cpu_memory`, when given)."""
    return row.total <= gpu_memory and (cpu_memory is None or row.cpu_peak <= cpu_memory)


def longest_row(
    shape: Shape, st: Strategy, s: Setup, *, gpu_memory: float | None, cpu_memory: float | None
) -> Row:
    """The row at the longest length (a multiple of sp, at most MAX_TOKENS) that fits, by
    doubling then bisection: memory never decreases with the length. None fits: the row at
    the shortest length, max_length None."""

    def at(k: int) -> Row:
        return plan_row(shape, st, replace(s, seq=k * s.sp))

    def ok(row: Row) -> bool:
        return not limits_failed(row, s.device, gpu_memory, cpu_memory=cpu_memory)

    best = at(1)
    if not ok(best):
        best.notes.append(f"no length fits, not even {s.sp} token(s) per row")
        return best
    lo, hi, cap = 1, 2, MAX_TOKENS // s.sp
    while hi <= cap:
        row = at(hi)
        if not ok(row):
            break
        lo, best, hi = hi, row, hi * 2
    hi = min(hi, cap + 1)  # the first multiple known not to fit (cap + 1: beyond the search)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        row = at(mid)
        if ok(row):
            lo, best = mid, row
        else:
            hi = mid
    best.max_length = lo * s.sp
    if lo == cap:
        best.notes.append(f"fits at {MAX_TOKENS:,} tokens, where the search stops")
    if shape.positions and best.max_length > shape.positions:
        best.notes.append(f"beyond the model's {shape.positions:,} positions: RoPE scaling needed")
    return best


def plan(
    model,
    ngpu: int = 1,
    nnodes: int = 1,
    *,
    strategies=None,
    seq: int | str = 2048,
    batch: int = 1,
    bf16: bool = False,
    checkpointing: bool = False,
    gpu_memory: float | None = None,
    peft: str | None = None,
    device: str = "gpu",
    runtime: float | None = None,
    lora_r: int = 64,
    loss_chunk: int = 512,
    loading: str = "streaming",
    cpu_memory: float | None = None,
    sp: int = 1,
) -> list[Row]:
    """The rows of the plan, cheapest first; `model` is a config dict, a config.json, a model
    folder, a PRESETS name or a Shape. `strategies`: names or Strategy objects (default: the
    registry's); `seq="auto"`: each row at its longest length that fits (needs a budget);
    `gpu_memory`, `cpu_memory` (bytes, per GPU and per node): judge each row's fit, and mark
    the cheapest that fits both. `sp`: --sequence_parallel_size. PlanError on bad input."""
    shape = model if isinstance(model, Shape) else Shape.from_config(model)
    auto = seq == "auto"
    s = Setup(
        ngpu=ngpu,
        nnodes=nnodes,
        seq=1 if auto else seq,
        batch=batch,
        bf16=bf16,
        checkpointing=checkpointing,
        device=device,
        peft=peft,
        lora_r=lora_r,
        loss_chunk=loss_chunk,
        loading=loading,
        runtime=runtime or 0.0,
        sp=sp,
    ).check(shape)
    gpu_memory = memory_size("--gpu_memory", gpu_memory)
    cpu_memory = memory_size("--cpu_memory", cpu_memory)
    if auto and (cpu_memory if device == "cpu" else gpu_memory) is None:
        need = "--cpu_memory" if device == "cpu" else "--gpu_memory"
        raise PlanError(f"--model_max_length auto: the longest length needs a budget ({need})")
    if isinstance(strategies, (str, Strategy)):
        strategies = [strategies]
    try:
        chosen = [parallel.get(x) for x in strategies] if strategies else parallel.by_cost()
    except parallel.UnknownStrategy:
        unknown = next(x for x in strategies if x not in parallel.STRATEGIES)
        raise PlanError(
            f"--strategy {_short(unknown)}: not one of {', '.join(parallel.names())}, or all"
        ) from None
    for st in chosen if strategies else ():
        reason = why_not(st, s)
        if reason:
            able = [x.name for x in parallel.by_cost() if not why_not(x, s)]
            raise PlanError(
                f"--strategy {st.name}: {reason}; strategies for this setup: "
                f"{', '.join(able) or 'none'}"
            )
    if device == "cpu" and runtime is None:
        s.runtime = measured_runtime()
    rows = []
    for st in sorted(chosen, key=lambda x: x.cost_rank):
        if why_not(st, s):
            continue
        row = (
            longest_row(shape, st, s, gpu_memory=gpu_memory, cpu_memory=cpu_memory)
            if auto
            else plan_row(shape, st, s)
        )
        failed = limits_failed(row, device, gpu_memory, cpu_memory=cpu_memory)
        if failed is not None:
            row.fits, row.fails = not failed, failed
        rows.append(row)
    fitting = [row for row in rows if row.fits]
    if fitting:  # rows run cheapest first
        fitting[0].cheapest = True
    return rows


# ---------------------------------------------------------------- the process runtime

RUNTIME_IMPORTS = (
    "torch",
    "torch.distributed.fsdp",
    "transformers",
    "datasets",
    "transformers.models.llama.modeling_llama",
    "recipes.full_finetune",
)


def measure_runtime(deepspeed: bool = True, recipe_argv: list[str] | None = None) -> float:
    """RSS (bytes) of a fresh Python process that imported what a training rank imports, joined a
    gloo process group and took one AdamW step of a 30K-parameter Llama (thread pools, kernels,
    allocator arenas): the floor under every CPU run's peak. With `recipe_argv` (a recipe's
    arguments) it also runs the recipe's prepare(): tokenizer, training set, batch plan, as that
    run will hold them. Measured, since it depends on the installed versions and the data."""
    mods = RUNTIME_IMPORTS + (("deepspeed",) if deepspeed else ())
    code = f"""
import importlib, os, pathlib, re, socket
for m in {mods!r}:
    importlib.import_module(m)
import torch
from transformers import LlamaConfig, LlamaForCausalLM
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1")
torch.distributed.init_process_group("gloo")
cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2)
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters())
ids = torch.randint(0, 256, (1, 128))
model(input_ids=ids, labels=ids).loss.backward()
opt.step()
del model, opt
torch.distributed.destroy_process_group()
argv = {recipe_argv!r}
if argv is not None:
    from recipes.core import objectives
    from recipes.core.config import load_config
    from recipes.core.loop import prepare
    from recipes.core.recipe import TrainConfig
    cfg, notes = load_config(argv, TrainConfig)
    run = prepare(cfg, objectives.get("sft"), notes)
t = pathlib.Path("/proc/self/status").read_text()
print(int(re.search(r"VmRSS:\\s+(\\d+)", t).group(1)) * 1024)
"""
    repo = Path(__file__).resolve().parents[1]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)}
    for key in ("MALLOC_MMAP_THRESHOLD_", "HOME", "CAMELID_CACHE", "CAMELID_SHARED_DATA"):
        if key in os.environ:  # the same allocator settings and caches as the run measured
            env[key] = os.environ[key]
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, env=env, check=True
    )
    return float(res.stdout.strip().splitlines()[-1])


def measured_runtime() -> float:
    """measure_runtime() for --device cpu, a failure as one PlanError line."""
    try:
        return measure_runtime()
    except subprocess.CalledProcessError as e:
        last = (e.stderr or "").strip().splitlines()[-1:] or [f"exit status {e.returncode}"]
        raise PlanError(
            f"--device cpu: measuring the process runtime failed ({last[0]}); give --runtime_mb"
        ) from None
    except (OSError, ValueError, IndexError) as e:
        raise PlanError(
            f"--device cpu: measuring the process runtime failed ({e}); give --runtime_mb"
        ) from None


# ---------------------------------------------------------------- command line


@dataclass
class PlanOptions:
    """What `python -m recipes.plan` reads: one field per option, its help in metadata, parsed by
    transformers' HfArgumentParser (the flags as FastChat and the recipes spell them)."""

    model: str = field(
        metadata={
            "help": "a model folder with config.json, the config.json, or "
            f"one of {', '.join(PRESETS)}"
        }
    )
    ngpu: int = option(1, "GPUs (processes) per node")
    nnodes: int = option(1, "nodes (--ngpu each)")
    strategy: str = option("all", "a strategy of recipes/core/parallel.py, or all")
    model_max_length: str = option(
        "2048", "tokens per training row, or auto: per strategy, the longest that fits"
    )
    per_device_train_batch_size: int = option(1, "rows per GPU in each step", aliases=["--batch"])
    bf16: bool = option(False, "bf16 mixed precision (else fp32)")
    gradient_checkpointing: bool = option(False, "activation checkpointing per decoder layer")
    sequence_parallel_size: int = option(
        1,
        "Ulysses sequence parallelism: ranks sharing each row (it divides the ranks, the "
        "attention heads and the key/value heads)",
    )
    gpu_memory: str = option("80GB", "memory of each GPU: 80GB, 141GiB, 1.5TB; a bare number is GB")
    cpu_memory: str | None = option(
        None, "host memory per node, as --gpu_memory; none: the host is not judged"
    )
    loss_chunk_size: int = option(
        512, "camelid's chunked loss rows (0: transformers' loss over all logits)"
    )
    loading: Literal["streaming", "full"] = option(
        "streaming", "streaming: sharded loading; full: every rank loads the whole model"
    )
    peft: Literal["lora", "qlora"] | None = option(
        None, "an adapter on a frozen base (qlora: on a 4-bit base); none: the full model"
    )
    lora_r: int = option(64, "LoRA rank, with --peft")
    device: Literal["gpu", "cpu"] = option(
        "gpu", "gpu: memory per GPU; cpu: each process's peak RSS of a CPU run (runtime measured)"
    )
    runtime_mb: float | None = option(
        None, "with --device cpu, each process's runtime in MiB; none: measured"
    )
    json: bool = option(False, "print the plan as JSON instead of the table")


SIZE = re.compile(r"\s*((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([KMGTP]i?B?|B)?\s*", re.I)


def parse_size(text: str, flag: str = "--gpu_memory") -> float:
    """80GB, 141GiB, 1.5T, 2e11B (a bare number is GB) in bytes: more than 0, at most 1 PB."""
    m = SIZE.fullmatch(text)
    if not m:
        raise PlanError(
            f"{flag} {text!r}: not a size (e.g. 80GB, 141GiB, 1.5TB; a bare number is GB)"
        )
    unit = (m[2] or "GB").upper().rstrip("B") or "B"
    scale = {
        "B": 1,
        "K": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "P": 1e15,
        "KI": 2**10,
        "MI": 2**20,
        "GI": 2**30,
        "TI": 2**40,
        "PI": 2**50,
    }[unit]
    value = float(m[1]) * scale
    if not 0 < value <= MAX_BYTES:  # inf (1e999) and 0 alike
        raise PlanError(f"{flag} {text!r}: a memory size is more than 0 and at most 1 PB")
    return value


def parse_length(text: str) -> int | str:
    """--model_max_length: tokens, or auto."""
    if text.strip().lower() == "auto":
        return "auto"
    if not re.fullmatch(r"\s*\d{1,18}\s*", text):
        raise PlanError(
            f"--model_max_length {text!r}: a whole number of tokens from 1 to "
            f"{MAX_TOKENS:,}, or auto"
        )
    return int(text)


def option_parser():
    """The project's one command-line convention (fastchat_data/options.py) over PlanOptions."""
    parser = build_parser(PlanOptions, prog="python -m recipes.plan", description=__doc__)
    actions = parser._option_string_actions
    actions["--strategy"].help = f"one of {', '.join(parallel.names())}, or all"
    for flag, metavar in (
        ("--model", "PATH"),
        ("--strategy", "NAME"),
        ("--gpu_memory", "SIZE"),
        ("--cpu_memory", "SIZE"),
        ("--model_max_length", "INT|auto"),
    ):
        actions[flag].metavar = metavar
    return parser


def parse_options(argv: list[str] | None = None) -> PlanOptions:
    argv = [
        "--per_device_train_batch_size" if a == "--batch" else a
        for a in (sys.argv[1:] if argv is None else argv)
    ]
    try:
        return parse(PlanOptions, argv, parser=option_parser())
    except UsageError as e:
        raise PlanError(str(e).removeprefix("command line: ")) from None


def plan_arguments(o: PlanOptions) -> dict:
    """plan()'s keywords from the command line (sizes and lengths parsed, ranges checked)."""
    gpu_memory = parse_size(o.gpu_memory, "--gpu_memory")
    runtime = None
    if o.runtime_mb is not None:
        if not 0 <= o.runtime_mb <= MAX_BYTES / MIB:  # NaN too
            raise PlanError(f"--runtime_mb {o.runtime_mb!r}: MiB from 0 to {MAX_BYTES / MIB:,.0f}")
        runtime = o.runtime_mb * MIB
    return dict(
        model=o.model,
        ngpu=o.ngpu,
        nnodes=o.nnodes,
        strategies=None if o.strategy == "all" else [o.strategy],
        seq=parse_length(o.model_max_length),
        batch=o.per_device_train_batch_size,
        bf16=o.bf16,
        checkpointing=o.gradient_checkpointing,
        gpu_memory=None if o.device == "cpu" else gpu_memory,
        cpu_memory=None if o.cpu_memory is None else parse_size(o.cpu_memory, "--cpu_memory"),
        peft=o.peft,
        device=o.device,
        runtime=runtime,
        lora_r=o.lora_r,
        loss_chunk=o.loss_chunk_size,
        loading=o.loading,
        sp=o.sequence_parallel_size,
    )


def to_json(rows: list[Row], shape: Shape, setup: dict) -> dict:
    out = {"model": {**asdict(shape), "params": shape.params}, "setup": setup, "rows": []}
    for row in rows:
        d = asdict(row)
        d["total"], d["cpu_peak"] = row.total, row.cpu_peak
        out["rows"].append(d)
    return out


def _grid(head: list[str], body: list[list[str]], left: tuple[int, ...]) -> list[str]:
    """Columns as wide as their widest value; the columns in `left` flush left."""
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    return [
        "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths))
        ).rstrip()
        for x in (head, *body)
    ]


def table(rows: list[Row], shape: Shape, setup: dict) -> str:
    """The plan as text: one row per strategy, columns as wide as their values, then what the
    columns mean, what "cheapest" means, and what to change when nothing fits."""
    cpu, sp, auto = setup["device"] == "cpu", setup["sp"], setup["seq"] == "auto"
    unit, uname = (MIB, "MiB") if cpu else (GB, "GB (1e9 bytes)")
    comps = [c for c in COMPONENTS if (c != "runtime" or cpu) and (c != "a2a" or sp > 1)]
    head = ["strategy", *comps, "total", "act/ckpt", "act full", "host", "load", "copies"]
    head += ["max len"] * auto + ["fits"]
    body = []
    for row in rows:
        mark = (
            ""
            if row.fits is None
            else "yes"
            if row.fits
            else "no: " + " and ".join({"gpu": "GPU", "host": "host"}[f] for f in row.fails)
        )
        if row.cheapest:
            mark += "  <- cheapest that fits"
        values = [
            *(row.per_rank[c] for c in comps),
            row.total,
            row.activations_ckpt,
            row.activations_no_ckpt,
            row.cpu_peak,
            row.per_node_cpu["load"],
        ]
        cells = [row.strategy, *(f"{v / unit:,.1f}" for v in values)]
        cells.append(f"{row.load_model_copies_per_node:.2f}")
        if auto:
            cells.append("none" if row.max_length is None else f"{row.max_length:,}")
        body.append([*cells, mark])
    who = "rank RSS" if cpu else "per GPU"
    tokens = "the longest length that fits" if auto else f"{setup['seq']:,} tokens"
    lines = [
        f"{shape.params / 1e9:.3f}B parameters ({shape.layers} layers, hidden {shape.hidden}, "
        f"{shape.heads} heads / {shape.kv_heads} kv, vocab {shape.vocab}); {tokens} x "
        f"{setup['batch']} row(s), {'bf16' if setup['bf16'] else 'fp32'}"
        f"{', checkpointing' if setup['checkpointing'] else ''}; {who} and per node host, {uname}",
        *_grid(head, body, left=(0, len(head) - 1)),
    ]
    gpu, host = setup["gpu_memory"], setup["cpu_memory"]
    judged = [f"each node's host peak <= --cpu_memory {host / GB:,.1f} GB"] if host else []
    if not cpu:
        judged.insert(0, f"per-GPU total <= --gpu_memory {gpu / GB:,.1f} GB")
    if judged:
        lines.append(f"fits: {' and '.join(judged)} (no: the limit exceeded)")
    if not cpu:
        lines.append(
            "host = the node's peak (train, load, export); load = the node's host bytes "
            "while loading; copies = fp32 model copies a node holds while loading"
        )
    lines.append(
        "rows run from least communication to most (replicas all-reduce gradients; "
        "sharding adds parameter gathers; offloading adds host round trips): "
        '"cheapest that fits" is the first row that fits'
    )
    if sp > 1:
        lines.append(
            f"sequence parallel {sp} (Ulysses): each row split over {sp} ranks; "
            f"activations and logits per rank for 1/{sp} of its tokens; data parallel "
            f"over {rows[0].data_parallel if rows else '?'} ranks; a2a = one layer's "
            "all-to-all send buffers (q, k, v)"
        )
    if auto:
        lines.append(
            f"max len: the longest --model_max_length (a multiple of {sp}) that fits; "
            "each row's memory is at that length"
        )
        if shape.positions and any((r.max_length or 0) > shape.positions for r in rows):
            lines.append(
                f"the model has {shape.positions:,} positions (max_position_embeddings): "
                "longer rows need RoPE scaling (the recipes' --rope_scaling) or a long-context "
                "model"
            )
    if rows and rows[0].fits is not None and not any(r.fits for r in rows):
        fixes = "--gradient_checkpointing, a shorter --model_max_length, --sequence_parallel_size"
        if cpu:
            fixes = f"more host memory or nodes, {fixes}, or --peft"
        else:
            fixes = f"more GPUs or nodes, {fixes}, or --peft"
            if any("host" in r.fails for r in rows):
                fixes += "; for the host: more host memory, or a row whose host column fits"
        lines.append(f"nothing fits: {fixes}")
    return "\n".join(lines)


def _printable(text: str) -> str:
    """One line with no control characters (a file name may hold any)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def write(text: str) -> None:
    """stdout, or a quiet exit 141 (as SIGPIPE's) when its reader went away (`| head -1`)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that nothing more fails
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(EXIT_BROKEN_PIPE) from None


def main(argv: list[str] | None = None) -> list[Row]:
    try:
        options = parse_options(argv)
        arguments = plan_arguments(options)
        shape = Shape.from_config(arguments.pop("model"))
        rows = plan(shape, **arguments)
    except PlanError as e:
        print(f"error: {_printable(str(e))}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    if options.json:
        setup = {k: v for k, v in asdict(options).items() if k != "json"}
        setup.update(
            {
                "gpu_memory": arguments["gpu_memory"],
                "cpu_memory": arguments["cpu_memory"],
                "model_max_length": arguments["seq"],
            }
        )
        write(json.dumps(to_json(rows, shape, setup), indent=2) + "\n")
    else:
        write(table(rows, shape, arguments) + "\n")
    return rows


if __name__ == "__main__":
    main()
