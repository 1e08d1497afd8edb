"""Will it fit? Per-rank GPU memory and per-node CPU memory of every training strategy, from a
model's config.json alone (no weights).

    python -m recipes.plan --model llama-2-70b/config.json --ngpu 8 --bf16 --gradient_checkpointing
    python -m recipes.plan --model DIR --ngpu 2 --device cpu --json     # peak RSS of a CPU run

Method (bytes per rank; N = ngpu x nnodes ranks, n = ngpu ranks per node, Psi parameters):
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
- Buffers: DDP's gradient buckets (a second copy of the grads: gradient_as_bucket_view is off);
  autocast's bf16 weight copies (2 Psi) under single/DDP; FSDP2: the root unit (embeddings,
  head, final norm; its grads are reduced last) and two decoder layers unsharded (current and
  prefetched), one layer's unsharded grads and, with bf16, their fp32 copy to reduce-scatter;
  fsdp_grad_op: every layer unsharded from forward to backward; ZeRO: the reduce buckets
  (reduce_bucket_size elements, twice under stage 2 with overlap_comm), stage 3's prefetch
  bucket and gathered params (kept for reuse up to stage3_max_live_parameters), the fp32 grad
  partition (stage 2: a copy, 4/N; stage 3: accumulated in fp32, 2/N over the paper, as
  DeepSpeed's own estimator counts 18 Psi/N); a CUDA context per GPU (1 GB). "auto" sizes
  are HF's: hidden^2, 0.9 hidden^2. On a CPU, torch.empty'd buckets count once touched.
- Host memory per node: each process's runtime, offloaded states (fsdp_offload,
  zero3_offload), the loading phase (sharded streaming: an FSDP2 rank reads its own rows, a
  ZeRO-3 rank its partition, straight into its shard; DDP and ZeRO-2 one fp32 copy per rank,
  through the mapped checkpoint file) and the export
  (rank 0 gathers one full copy in the export dtype).
- With --device cpu (a CPU run) every component is host memory: each process's peak RSS per
  phase is predicted, with the runtime measured (imports, gloo, one tiny step; Python API:
  also the run's tokenizer and training set).

`plan(...)` returns the rows; `fits(row, gpu_memory)` is the launcher's pre-flight check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

GB = 1e9  # the ZeRO paper's and the GPU vendors' gigabyte
MIB = 2**20
DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"

# cheapest first: less communication, fewer moving parts, no host round trips
STRATEGIES = (
    "single",
    "ddp",
    "zero2",
    "fsdp_grad_op",
    "fsdp",
    "zero3",
    "fsdp_offload",
    "zero3_offload",
)
PEFT_STRATEGIES = {"lora": ("single", "ddp", "zero2", "zero3"), "qlora": ("single", "ddp")}
ADAM_K = 12  # fp32 master + momentum + variance, bytes per parameter (ZeRO paper, sec. 3.1)
# CUDA context, cuBLAS workspace and NCCL buffers per GPU process (typical for CUDA 12)
CUDA_CONTEXT = 1.0 * GB
# DeepSpeed's defaults where its JSON is silent (deepspeed.runtime.zero.config)
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
               "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
               "overlap_comm": False}  # fmt: skip
# Llama-2's published config.json values (meta-llama/Llama-2-*-hf), for --model llama-2-7b
PRESETS = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False, torch_dtype="float16"),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False, torch_dtype="float16"),
    "llama-2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False, torch_dtype="float16"),
}  # fmt: skip
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
COMPONENTS = ("params", "grads", "optim", "activations", "logits", "buffers", "runtime")


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

    @classmethod
    def from_config(cls, config: dict | str | Path) -> Shape:
        """A Llama-family config.json (a dict, the file, or the folder holding it)."""
        if isinstance(config, str) and config in PRESETS:
            config = PRESETS[config]
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            config = json.loads(path.read_text())
        c = config.get("text_config", config)  # multimodal wrappers nest the language model
        heads = c["num_attention_heads"]
        return cls(vocab=c["vocab_size"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                   layers=c["num_hidden_layers"], heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                   tied=bool(c.get("tie_word_embeddings", False)), attention_bias=bool(c.get("attention_bias")),
                   mlp_bias=bool(c.get("mlp_bias")),
                   file_bytes=DTYPE_BYTES.get(c.get("torch_dtype") or c.get("dtype"), 4))  # fmt: skip

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's linear layers."""
        h, i = self.hidden, self.intermediate
        return [(h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h),
                (h, i), (h, i), (i, h)]  # fmt: skip

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


def lora_params(shape: Shape, r: int) -> int:
    """LoRA A (r x in) and B (out x r) on every linear layer of every decoder layer."""
    return shape.layers * sum(r * (a + b) for a, b in shape.linears())


def nf4_bytes_per_param(blocksize: int = 64, double_quant: bool = True) -> float:
    """4-bit weights plus quantization constants (QLoRA paper, sec. 3): one absmax per block,
    8-bit with double quantization plus one fp32 constant per 256 blocks, else fp32."""
    consts = (1 / blocksize + 4 / (blocksize * 256)) if double_quant else 4 / blocksize
    return 0.5 + consts


# ---------------------------------------------------------------- activations


def layer_activation_bytes(shape: Shape, seq: int, batch: int, p: int) -> float:
    """What autograd keeps for one Llama decoder layer's backward (see the module docstring);
    checked tensor by tensor against saved_tensors_hooks in tests/test_plan.py."""
    sb, h = seq * batch, shape.hidden
    kv = shape.kv_dim if batch == 1 else shape.q_dim  # a padding mask makes HF repeat k and v
    # per RMSNorm: fp32 input, normalised and scaled outputs, fp32 1/rms per token
    norms = 2 * ((4 + 2 * p) * h + 4)
    # q, k, v, and the fused kernel's output (already in o_proj's layout), fp32 logsumexp
    attention = p * (2 * shape.q_dim + 2 * kv) + 4 * shape.heads
    mlp = 4 * p * shape.intermediate  # gate, SiLU(gate), up, their product
    return sb * (norms + attention + mlp)


def rope_bytes(shape: Shape, seq: int, batch: int, p: int) -> float:
    """cos and sin, computed once per forward and saved by every layer."""
    return 2 * p * seq * batch * shape.head_dim


def activation_bytes(shape: Shape, seq: int, batch: int, p: int, checkpointing: bool) -> float:
    layer = layer_activation_bytes(shape, seq, batch, p)
    outside = seq * batch * ((4 + 2 * p) * shape.hidden + 4) + rope_bytes(shape, seq, batch, p)
    if checkpointing:  # layer inputs kept, one layer's activations live again during recompute
        return shape.layers * p * seq * batch * shape.hidden + layer + outside
    return shape.layers * layer + outside


def logits_bytes(shape: Shape, seq: int, batch: int, p: int, chunk: int = 0) -> float:
    """Logits (compute dtype), their fp32 log-softmax and its gradient; camelid's chunked loss
    (recipes/core/loss.py) holds `chunk` rows of them at a time."""
    rows = batch * seq if chunk <= 0 else min(batch * seq, chunk)
    return rows * shape.vocab * (p + 4 + 4)


# ---------------------------------------------------------------- model states (ZeRO paper)


def model_states_bytes(psi: float, stage: int, n: int, k: float = ADAM_K) -> dict[str, float]:
    """Mixed-precision model states per rank, ZeRO paper sec. 5 / Figure 1: 2 Psi params, 2 Psi
    grads, K Psi optimizer; stage 1 shards the optimizer, 2 also grads, 3 also params."""
    return {"params": 2 * psi / (n if stage >= 3 else 1), "grads": 2 * psi / (n if stage >= 2 else 1),
            "optim": k * psi / (n if stage >= 1 else 1)}  # fmt: skip


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

    @property
    def ranks(self) -> int:
        return self.ngpu * self.nnodes


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
    fits: bool | None = None
    cheapest: bool = False

    @property
    def total(self) -> float:
        return sum(self.per_rank.values())

    @property
    def cpu_peak(self) -> float:
        return max(self.per_node_cpu.values())


def ds_zero_config(strategy: str, shape: Shape) -> dict:
    """The bucket sizes of ds_configs/<strategy>.json; "auto" as HF's integration fills it."""
    from recipes.core.config import ZERO_AUTO_SIZES  # the engine's own fill rule

    z = json.loads((DS_CONFIG_DIR / f"{strategy}.json").read_text()).get("zero_optimization", {})
    out = {}
    for key, default in DS_DEFAULTS.items():
        v = z.get(key, default)
        out[key] = (
            (ZERO_AUTO_SIZES[key](shape.hidden) if key in ZERO_AUTO_SIZES else default)
            if v == "auto"
            else v
        )
    return out


def plan_row(shape: Shape, strategy: str, s: Setup) -> Row:
    N, n = s.ranks, s.ngpu
    if strategy == "single" and N != 1:
        N = n = 1
    cpu = s.device == "cpu"
    p = 2 if s.bf16 else 4  # compute dtype bytes
    psi = shape.params
    layer, root = shape.layer_params, shape.root_params
    act_ckpt = activation_bytes(shape, s.seq, s.batch, p, True)
    act_full = activation_bytes(shape, s.seq, s.batch, p, False)
    r = {c: 0.0 for c in COMPONENTS}
    r["activations"] = act_ckpt if s.checkpointing else act_full
    r["logits"] = logits_bytes(shape, s.seq, s.batch, p, s.loss_chunk)
    notes: list[str] = []
    host = {"offloaded": 0.0}
    zero = strategy.startswith("zero")
    released = 0.0  # ZeRO-3's gathered params, partitioned again after each step
    sharded = strategy in ("fsdp", "fsdp_grad_op", "fsdp_offload", "zero3", "zero3_offload")

    def touched(elements: float) -> float:
        """A torch.empty'd bucket: on a GPU all of it, on a CPU only the pages written."""
        return min(elements, psi) if cpu else elements

    if s.peft:
        # frozen base, replicated or (ZeRO-3) sharded; adapter with fp32 weights, grads, Adam
        base_b = nf4_bytes_per_param() * shape.linear_params + 2 * (psi - shape.linear_params) \
            if s.peft == "qlora" else 2 * psi  # fmt: skip
        if not s.bf16 and s.peft == "lora":
            base_b = 4 * psi
        ad = lora_params(shape, s.lora_r)
        r["params"] = base_b / (N if strategy == "zero3" else 1) + 4 * ad
        r["grads"] = 4 * ad
        r["optim"] = 8 * ad
        biggest = max(a * b for a, b in shape.linears())
        if s.peft == "qlora":
            r["buffers"] += 2 * biggest  # one weight dequantized to bf16 at a time
        if strategy == "ddp":
            r["buffers"] += 4 * ad  # DDP's buckets
        notes.append(f"adapter r={s.lora_r}: {ad / 1e6:.1f}M trainable")
    elif zero:
        stage = 3 if strategy.startswith("zero3") else 2
        ds = ds_zero_config(strategy, shape)
        if s.bf16:
            st = model_states_bytes(psi, stage, N)
        else:  # fp32 module; ZeRO still clones an fp32 partition: master 4 + Adam 8
            st = {k: v * 2 for k, v in model_states_bytes(psi, stage, N, k=6).items()}
        r.update(st)
        bucket = ds["reduce_bucket_size"] * (2 if stage == 2 and ds["overlap_comm"] else 1)
        r["buffers"] += touched(bucket) * p
        if stage == 2:  # the fp32 grad partition the optimizer steps on (a copy)
            r["buffers"] += 4 * psi / N
        elif s.bf16:  # stage 3 accumulates the grad partition in fp32: 2 bytes over the paper's
            r["buffers"] += 2 * psi / N
        if stage == 3:
            # gathered params are kept for reuse (stage3_max_reuse_distance, 1e9 by default)
            # up to stage3_max_live_parameters
            reuse = ds["stage3_max_reuse_distance"] >= ds["stage3_max_live_parameters"]
            live = min(ds["stage3_max_live_parameters"], psi if reuse else 2 * layer + root)
            released = p * (live + min(ds["stage3_prefetch_bucket_size"], layer))
            r["buffers"] += released
        if (
            strategy == "zero3_offload" and not cpu
        ):  # param and grad partitions, optimizer: all on the host
            fp32_grads = 2 * psi / N if s.bf16 else 0.0
            host["offloaded"] = (r["params"] + r["grads"] + r["optim"] + fp32_grads) * n
            r["buffers"] -= fp32_grads
            r["params"] = r["grads"] = r["optim"] = 0.0
            notes.append("params, grads, optimizer in host memory; the GPU holds gathered layers")
    elif strategy in ("single", "ddp"):
        r.update(params=4 * psi, grads=4 * psi, optim=8 * psi)
        if s.bf16:
            r["buffers"] += 2 * psi  # autocast's bf16 weight copies, kept for backward
        if strategy == "ddp":
            r["buffers"] += 4 * psi  # gradient buckets: a second copy of the fp32 grads
    else:  # FSDP2
        r.update(params=4 * psi / N, grads=4 * psi / N, optim=8 * psi / N)
        gathered = 2 * layer if strategy != "fsdp_grad_op" else shape.layers * layer
        # unsharded grads: the root's live through the whole backward (its reduce-scatter runs
        # last), one layer's at a time; with bf16 each is cast to fp32 to reduce-scatter
        grads = p * (root + layer) + (4 * max(root, layer) if p != 4 else 0)
        r["buffers"] += p * (root + gathered) + grads
        if strategy == "fsdp_grad_op":
            notes.append("every layer stays unsharded between forward and backward")
        if strategy == "fsdp_offload" and not cpu:  # on a CPU the states stay in the process
            host["offloaded"] = (r["params"] + r["grads"] + r["optim"]) * n
            r["params"] = r["grads"] = r["optim"] = 0.0
            notes.append("params, grads, optimizer in host memory (CPUOffloadPolicy)")
    if cpu:
        r["runtime"] = s.runtime
        host["offloaded"] = 0.0  # on a CPU the "device" is the host: counted per process above
    elif s.device == "gpu":
        r["buffers"] += CUDA_CONTEXT

    # loading: sharded streaming (FSDP2 / ZeRO-3) vs one fp32 copy per rank
    streams = s.loading == "streaming" and (sharded or (s.peft and strategy == "zero3"))
    copies_per_node = n / N if streams else n
    # checkpoint pages a rank maps while loading (in its RSS; in the page cache once per node):
    # sharded loading reads its rows / partition with plain file reads (nothing mapped);
    # from_pretrained maps the whole file
    file = shape.file_bytes * psi
    mapped = 0.0 if streams else file
    node_mapped = mapped  # shared pages count once per node
    load_bytes = 4 * psi * copies_per_node + node_mapped
    # export: rank 0 gathers one full copy; DeepSpeed gathers in the module dtype
    export_dtype = p if zero and s.bf16 else 4
    if s.peft:
        export_dtype, export_n = 4, lora_params(shape, s.lora_r)
    else:
        export_n = psi
    runtime_node = (s.runtime if cpu else s.cpu_runtime) * n
    steady = runtime_node + host["offloaded"] + (sum(r.values()) - r["runtime"]) * n * cpu
    per_node_cpu = {"train": steady, "load": runtime_node + load_bytes + host["offloaded"],
                    "export": steady + export_dtype * export_n}  # fmt: skip
    row = Row(strategy, N, r, act_full, act_ckpt, per_node_cpu, copies_per_node, notes)
    if cpu:
        # load: until the model is in its training layout with its weights (the engine's
        # optimizer states come after, in the "setup" phase)
        load = r["runtime"] + 4 * psi * copies_per_node / n + mapped
        # after training: grads freed (set_to_none), persistent buffers stay (DDP's buckets,
        # ZeRO's buckets and grad partitions); FSDP frees its unsharded layers
        kept = r["buffers"] - released if strategy == "ddp" or zero else 0.0
        after = r["runtime"] + r["params"] + r["optim"] + kept + (r["grads"] if zero else 0.0)
        # rank 0: the gathered state dict (save_pretrained writes it without another copy:
        # measured by bench/memory_bench.py)
        gathered = export_dtype * export_n
        # a replicated model's state dict on a CPU: .cpu() returns the live tensors, no copy
        copied = 0.0 if strategy in ("single", "ddp", "zero2") else gathered
        row.process_phases = {"load": load, "train": row.total,
                              "export": after + copied}  # fmt: skip
        row.process_export_other = after
    return row


def plan(model, ngpu: int = 1, nnodes: int = 1, strategies=None, seq: int = 2048, batch: int = 1,
         bf16: bool = False, checkpointing: bool = False, gpu_memory: float | None = None,
         peft: str | None = None, device: str = "gpu", runtime: float | None = None,
         lora_r: int = 64, loss_chunk: int = 512, loading: str = "streaming") -> list[Row]:  # fmt: skip
    """The rows of the plan; `model` is a config dict, a config.json, or a model folder."""
    shape = model if isinstance(model, Shape) else Shape.from_config(model)
    if device == "cpu" and runtime is None:
        runtime = measure_runtime()
    s = Setup(ngpu, nnodes, seq, batch, bf16, checkpointing, device, peft, lora_r, loss_chunk,
              loading, runtime or 0.0)  # fmt: skip
    names = list(strategies or STRATEGIES)
    if peft:
        names = [x for x in names if x in PEFT_STRATEGIES[peft]]
    if s.ranks > 1:
        names = [x for x in names if x != "single"]
    else:  # one process: camelid's torch engine runs it as single; DeepSpeed still offloads
        names = [x for x in names if x == "single" or x.startswith("zero")]
    rows = [plan_row(shape, x, s) for x in names]
    if gpu_memory:
        for row in rows:
            row.fits = fits(row, gpu_memory)
        fitting = [row for row in rows if row.fits]
        if fitting:  # STRATEGIES is ordered cheapest first
            fitting[0].cheapest = True
    return rows


def fits(row: Row, gpu_memory: float, cpu_memory: float | None = None) -> bool:
    """The pre-flight check: every rank's peak under `gpu_memory` bytes (and the node's host
    memory under `cpu_memory`, when given)."""
    return row.total <= gpu_memory and (cpu_memory is None or row.cpu_peak <= cpu_memory)


# ---------------------------------------------------------------- the process runtime

RUNTIME_IMPORTS = ("torch", "torch.distributed.fsdp", "transformers", "datasets",
                   "transformers.models.llama.modeling_llama", "recipes.full_finetune")  # fmt: skip


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
    from recipes.core.config import load_config
    from recipes.core.loop import prepare
    run = prepare(*load_config(argv))
t = pathlib.Path("/proc/self/status").read_text()
print(int(re.search(r"VmRSS:\\s+(\\d+)", t).group(1)) * 1024)
"""
    repo = Path(__file__).resolve().parents[1]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)}
    for key in ("MALLOC_MMAP_THRESHOLD_", "HOME", "CAMELID_CACHE", "CAMELID_SHARED_DATA"):
        if key in os.environ:  # the same allocator settings and caches as the run measured
            env[key] = os.environ[key]
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo,
                         env=env, check=True)  # fmt: skip
    return float(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- command line


def parse_size(text: str) -> float:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B?|B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 80GB, 141GiB)")
    unit = (m.group(2) or "GB").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]  # fmt: skip
    return float(m.group(1)) * scale


def to_json(rows: list[Row], shape: Shape, s: dict) -> dict:
    out = {"model": {**asdict(shape), "params": shape.params}, "setup": s, "rows": []}
    for row in rows:
        d = asdict(row)
        d["total"], d["cpu_peak"] = row.total, row.cpu_peak
        out["rows"].append(d)
    return out


def table(rows: list[Row], shape: Shape, device: str, unit: float, uname: str) -> str:
    head = "rank RSS" if device == "cpu" else "per GPU"
    cols = ("params", "grads", "optim", "activations", "logits", "buffers") + (
        ("runtime",) if device == "cpu" else ()
    )
    lines = [f"{shape.params / 1e9:.3f}B parameters ({shape.layers} layers, hidden {shape.hidden}, "
             f"{shape.heads} heads / {shape.kv_heads} kv, vocab {shape.vocab}); {head} and per node host, {uname}",
             f"{'strategy':14}" + "".join(f"{c[:7]:>9}" for c in cols) + f"{'total':>9}{'act/ckpt':>9}"
             f"{'act full':>9}{'host':>9}{'load':>9}{'copies':>7}  fits"]  # fmt: skip
    for row in rows:
        mark = "" if row.fits is None else ("yes" if row.fits else "no")
        if row.cheapest:
            mark += "  <- cheapest that fits"
        pr = row.per_rank
        lines.append(f"{row.strategy:14}" + "".join(f"{pr[c] / unit:>9,.1f}" for c in cols)
                     + f"{row.total / unit:>9,.1f}{row.activations_ckpt / unit:>9,.1f}"
                     f"{row.activations_no_ckpt / unit:>9,.1f}{row.cpu_peak / unit:>9,.1f}"
                     f"{row.per_node_cpu['load'] / unit:>9,.1f}{row.load_model_copies_per_node:>7.2f}  {mark}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    from recipes.core.config import HelpFormatter

    ap = argparse.ArgumentParser(prog="python -m recipes.plan", description=__doc__,
                                 formatter_class=HelpFormatter, allow_abbrev=False)  # fmt: skip
    ap.add_argument("--model", required=True, help="a model folder with config.json, or the file")
    ap.add_argument("--ngpu", type=int, default=1, help="GPUs (processes) per node")
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--strategy", default="all", help=f"one of {', '.join(STRATEGIES)}, or all")
    ap.add_argument("--model_max_length", type=int, default=2048)
    ap.add_argument("--per_device_train_batch_size", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (else fp32)")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--gpu_memory", type=parse_size, default=parse_size("80GB"))
    ap.add_argument("--cpu_memory", type=parse_size, default=None, help="host memory per node")
    ap.add_argument("--loss_chunk_size", type=int, default=512,
                    help="camelid's chunked loss rows (0: transformers' loss over all logits)")  # fmt: skip
    ap.add_argument("--loading", choices=("streaming", "full"), default="streaming",
                    help="streaming: sharded loading; full: every rank loads the whole model")  # fmt: skip
    ap.add_argument("--peft", choices=("lora", "qlora"), default=None)
    ap.add_argument("--lora_r", type=int, default=64)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                    help="cpu: predict each process's peak RSS of a CPU run (runtime measured)")  # fmt: skip
    ap.add_argument("--runtime_mb", type=float, default=None, help="skip measuring the runtime")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.strategy != "all" and a.strategy not in STRATEGIES:
        ap.error(f"--strategy {a.strategy!r}: choose from {', '.join(STRATEGIES)} or all")
    shape = Shape.from_config(a.model)
    runtime = a.runtime_mb * MIB if a.runtime_mb is not None else None
    memory = None if a.device == "cpu" else a.gpu_memory
    rows = plan(shape, a.ngpu, a.nnodes, None if a.strategy == "all" else [a.strategy], a.model_max_length,
                a.per_device_train_batch_size, a.bf16, a.gradient_checkpointing, memory, a.peft, a.device,
                runtime, a.lora_r, a.loss_chunk_size, a.loading)  # fmt: skip
    if a.device == "cpu" and a.cpu_memory:
        for row in rows:
            row.fits = row.total * row.ranks <= a.cpu_memory
    elif a.cpu_memory:
        for row in rows:
            row.fits = fits(row, a.gpu_memory, a.cpu_memory)
    if a.json:
        setup = {k: v for k, v in vars(a).items() if k != "json"}
        print(json.dumps(to_json(rows, shape, setup), indent=2))
        return rows
    unit, uname = (MIB, "MiB") if a.device == "cpu" else (GB, "GB (1e9 bytes)")
    print(table(rows, shape, a.device, unit, uname))
    if a.device != "cpu":
        print(f"fits: per-GPU total <= --gpu_memory {a.gpu_memory / GB:,.1f} GB; host = the node's peak "
              f"(train, load, export), load = the node's host bytes while loading, copies = fp32 model "
              f"copies a node holds while loading")  # fmt: skip
        if not any(r.fits for r in rows):
            print(
                "nothing fits: more GPUs, --gradient_checkpointing, a shorter --model_max_length, or --peft"
            )
    return rows


if __name__ == "__main__":
    main()
