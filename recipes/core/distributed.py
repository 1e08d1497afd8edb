"""Process groups and the training engines: one interface over DDP, FSDP2 and DeepSpeed ZeRO.

Why not HF Trainer or accelerate: on CPU both silently fall back to DDP when asked for FSDP,
and Trainer trains each rank alone unless `use_cpu=True`. camelid drives torch's FSDP2
(`fully_shard`) and `deepspeed.initialize` directly, so the code that runs on gloo here is the
code that runs on NCCL on GPUs; no library internals are patched.

Loss scaling: each micro-batch's loss is its token-loss sum divided by the number of trained
tokens in the whole global batch (all micro-batches, all ranks). Summed over micro-batches and
ranks that is exactly the global batch's mean token loss, whatever the split; the engines
undo the averaging their gradient reduction does, so every strategy takes the same step.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import load_json_state, save_json_state
from .config import ZERO_AUTO_SIZES, ConfigError, TrainConfig, read_structured
from .logging import PHASES
from .safe_load import dcp_load, deepspeed_loads_weights_only

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


@dataclass
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def all_sum(self, value: float | int) -> float:
        return self.all_sums([value])[0]

    def all_sums(self, values: list[float | int]) -> list:
        """Each value summed over the ranks, in one all-reduce."""
        if self.size == 1:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def main_first(self, fn):
        """fn() on rank 0 while the others wait; all ranks learn whether it failed, so a bad
        config or bad data stops every rank together with rank 0's message (instead of the
        others dying on a barrier whose peer has gone)."""
        from fastchat_data.schema import DataError

        result, error = None, None
        if self.main:
            try:
                result = fn()
            except (ConfigError, DataError) as e:
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


def init_world(strategy: str) -> World:
    """Join the process group the launcher set up (torchrun or deepspeed env vars)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"{size} processes per node but only {torch.cuda.device_count()} GPUs on this node"
        )
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if strategy.startswith("zero"):
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)
            if not cuda:
                atexit.register(remove_shm_buffer, local_rank)
        else:
            dist.init_process_group(backend, device_id=device if cuda else None)
    if strategy == "single" and size > 1:
        raise ConfigError("strategy 'single' runs one process; use ddp, fsdp or zero* for several")
    return World(rank, local_rank, size, device)


def remove_shm_buffer(local_rank: int) -> None:
    """DeepSpeed's CPU all-reduce keeps a ~70 MB buffer per rank in /dev/shm and never removes
    it: every CPU run would leave its buffers in memory (tmpfs) until reboot."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{local_rank}"):
        path.unlink(missing_ok=True)


def decoder_layer_classes(model) -> set[type]:
    """The model's own decoder-layer classes, as the model declares them (`_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(
            f"{type(model).__name__} declares no decoder layer class (_no_split_modules) to shard by"
        )
    return classes


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on norms and biases (as HF Trainer does)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # an adapter may have no vectors to train; ZeRO drops empty groups, the scheduler would not
    return [g for g in groups if g["params"]]


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch AdamW, or bitsandbytes' paged / 8-bit AdamW (QLoRA's memory savers; without CUDA
    bitsandbytes runs them unpaged)."""
    kwargs = dict(
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon
    )
    if cfg.optim == "adamw_torch":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)
    import bitsandbytes as bnb

    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "adamw_8bit": bnb.optim.AdamW8bit}[cfg.optim]  # fmt: skip
    return cls(param_groups(model, cfg.weight_decay), **kwargs)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """transformers' schedule, with Trainer's warm-up: ratio x steps rounded up
    (TrainingArguments.get_warmup_steps), so 0.03 of 100 steps warms up over 3, not 2."""
    from transformers import get_scheduler

    warmup_steps = math.ceil(total_steps * cfg.warmup_ratio)
    return get_scheduler(cfg.lr_scheduler_type, optimizer, warmup_steps, total_steps)


class TorchEngine:
    """single process, DDP, or FSDP2 (`fully_shard` per decoder layer, then the root):
    fsdp reshards parameters after forward (ZeRO-3-like), fsdp_grad_op keeps them gathered
    until backward (ZeRO-2-like, FastChat's shard_grad_op), fsdp_offload keeps parameters,
    gradients and optimizer states on the CPU (CPUOffloadPolicy).

    A model on the meta device (recipes/core/loading.py) is sharded first, then this rank's
    shards are materialised and read from `weights_from`."""

    def __init__(self, model, cfg: TrainConfig, world: World, total_steps: int,
                 weights_from: str | None = None):  # fmt: skip
        self.cfg, self.world = cfg, world
        self.strategy = cfg.strategy if world.size > 1 else "single"
        offload = self.strategy == "fsdp_offload"
        on_meta = any(p.is_meta for p in model.parameters())
        if on_meta and not self.strategy.startswith("fsdp"):
            raise ConfigError(f"a model on the meta device needs FSDP, not {self.strategy}")
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if on_meta else {}
        if not (on_meta or offload or getattr(model, "is_quantized", False)):
            model.to(world.device)  # (bitsandbytes placed a quantized model when loading)
        if self.strategy.startswith("fsdp"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(world.device.type, (world.size,))
            mp = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                if cfg.bf16
                else MixedPrecisionPolicy()
            )
            kw = dict(
                mesh=mesh, mp_policy=mp, reshard_after_forward=self.strategy != "fsdp_grad_op"
            )
            if offload:
                kw["offload_policy"] = CPUOffloadPolicy(pin_memory=world.device.type == "cuda")
            layers = tuple(decoder_layer_classes(model))
            for m in list(model.modules()):
                if isinstance(m, layers):
                    fully_shard(m, **kw)
            fully_shard(model, **kw)
            if on_meta:
                from .loading import fill_sharded

                model.to_empty(device="cpu" if offload else world.device)
                fill_sharded(model, weights_from, buffers)
            if offload:  # FSDP moves parameters for compute; buffers must already be there
                for m in model.modules():
                    for name, buf in m.named_buffers(recurse=False):
                        m._buffers[name] = buf.to(world.device)
            self.module = self.model = model
        elif self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.module = model
            self.model = DistributedDataParallel(
                model, device_ids=[world.local_rank] if world.device.type == "cuda" else None
            )
        else:
            self.module = self.model = model
        PHASES.next("setup")  # the model is in place; optimizer states and resume follow
        self.optimizer = make_optimizer(self.module, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, total_steps)
        # FSDP2 casts through its policy
        self._autocast = cfg.bf16 and not self.strategy.startswith("fsdp")

    def forward(self, **batch):
        from .loss import forward_with_loss

        chunk = self.cfg.loss_chunk_size
        with torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=self._autocast):
            return forward_with_loss(self.model, self.module, chunk, **batch)

    def sync_gradients(self, last_micro_step: bool):
        """Reduce gradients across ranks only on the last micro-step of an optimizer step."""
        if self.strategy == "ddp" and not last_micro_step:
            return self.model.no_sync()
        if self.strategy.startswith("fsdp"):
            self.model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()

    def backward(self, loss):
        (loss * self.world.size).backward()  # DDP and FSDP average gradients over ranks

    def step(self, last_micro_step: bool, loss_finite: bool = True) -> tuple[float, bool] | None:
        """After each micro-step's backward; on the last, steps the optimizer unless the loss
        (on any rank: `loss_finite` is agreed by all) or the global grad norm is not finite.
        Returns (grad norm, whether the step was applied)."""
        if not last_micro_step:
            return None
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        norm = float(norm)  # reduced gradients: the same on every rank
        applied = loss_finite and math.isfinite(norm)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # checkpoints: torch distributed checkpoint, every rank writes its own shard
    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "dcp"))
        if self.world.main:
            save_json_state(self.scheduler.state_dict(), path / "scheduler.json")

    def load(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp_load(state, path / "dcp")  # the restricted reader (recipes/core/safe_load.py)
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
        self.scheduler.load_state_dict(load_json_state(path / "scheduler.json"))

    def full_state_dict(self, trainable_only: bool = False) -> dict:
        """The whole model (or its trained parameters: an adapter, never under FSDP) on rank 0's
        CPU, gathered layer by layer (never whole on a GPU)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.strategy.startswith("fsdp"):
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.module, options=opts)
        return replicated_state_dict(self.module, self.world, trainable_only)


def replicated_state_dict(module, world: World, trainable_only: bool) -> dict:
    """Every rank holds the whole model (1 process, DDP, ZeRO-2): rank 0 copies it to CPU."""
    if not world.main:
        return {}
    if trainable_only:
        return {n: p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def deepspeed_config(cfg: TrainConfig, hidden_size: int | None = None) -> dict:
    """The DeepSpeed JSON with its "auto" values filled from the command line and the model's
    hidden size; a user's explicit number always wins. A precision block that contradicts the
    command line is an error, never silently used."""
    path = Path(cfg.deepspeed) if cfg.deepspeed else DS_CONFIG_DIR / f"{cfg.strategy}.json"
    ds = read_structured(path, json.loads, "JSON")
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{path}: enables fp16, which camelid does not train in; use bf16")
    bf16 = ds.setdefault("bf16", {}).get("enabled", "auto")
    if bf16 != "auto" and bool(bf16) != cfg.bf16:
        raise ConfigError(
            f"{path}: bf16.enabled is {bf16} but the command line says --bf16 {cfg.bf16}"
        )
    ds["bf16"]["enabled"] = cfg.bf16
    ds.pop("fp16", None)
    fill = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"{path}: {key} is {ds[key]} but the command line says {value}")
    ds.pop("train_batch_size", None)  # derived; ZeRO-3 rejects a stale one
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)  # camelid passes the same torch AdamW + schedule to every strategy
    zero = ds.setdefault("zero_optimization", {})
    for key, size in ZERO_AUTO_SIZES.items():
        if zero.get(key) == "auto":
            if hidden_size:
                zero[key] = size(hidden_size)
            else:  # no model to size from: DeepSpeed's defaults
                del zero[key]
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 1 << 30)
    return ds


class DeepSpeedEngine:
    """ZeRO-2 / ZeRO-3 (optionally offloaded) through `deepspeed.initialize`."""

    def __init__(self, model, cfg: TrainConfig, world: World, total_steps: int):
        import deepspeed

        self.cfg, self.world, self.strategy = cfg, world, cfg.strategy
        PHASES.next("setup")  # the model is in place; DeepSpeed allocates optimizer states now
        self.ds_config = deepspeed_config(cfg, model.config.hidden_size)
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg, total_steps)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.module = self.model.module

    def forward(self, **batch):
        from .loss import forward_with_loss

        return forward_with_loss(self.model, self.module, self.cfg.loss_chunk_size, **batch)

    def sync_gradients(self, last_micro_step: bool):
        return contextlib.nullcontext()  # DeepSpeed tracks accumulation boundaries itself

    def backward(self, loss):
        # DeepSpeed divides by gradient_accumulation_steps and averages over ranks: undo both.
        self.model.backward(loss * self.world.size * self.cfg.gradient_accumulation_steps)

    def step(self, last_micro_step: bool, loss_finite: bool = True) -> tuple[float, bool] | None:
        # DeepSpeed steps the optimizer only at its accumulation boundary, and skips (neither
        # applies nor schedules) a step whose gradients are not finite: a non-finite loss
        # always gives such gradients; was_step_applied() reports what it did.
        self.model.step()
        if not last_micro_step:
            return None
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        applied = self.model.was_step_applied()
        if applied and not loss_finite:
            raise RuntimeError("DeepSpeed applied a step whose loss was not finite")
        return norm, applied and math.isfinite(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path) -> None:
        self.model.save_checkpoint(str(path / "deepspeed"), tag="state")

    def load(self, path: Path) -> None:
        with deepspeed_loads_weights_only():  # DeepSpeed's torch.load(weights_only=False) calls
            load_path, _ = self.model.load_checkpoint(str(path / "deepspeed"), tag="state")
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path / 'deepspeed'}")

    def full_state_dict(self, trainable_only: bool = False) -> dict:
        """ZeRO-3: parameters gathered one by one in 16 bit (the model's dtype) onto rank 0's
        CPU; ZeRO-2: every rank holds the whole model already. trainable_only: an adapter's
        parameters, which under ZeRO-3 are partitioned like the rest (a plain state_dict()
        would hold empty placeholders)."""
        if self.strategy.startswith("zero3"):
            from deepspeed.runtime.zero import GatheredParameters

            sd = {}
            for name, param in self.module.named_parameters():
                if trainable_only and not param.requires_grad:
                    continue
                with GatheredParameters([param], modifier_rank=None):  # one tensor at a time
                    if self.world.main:
                        sd[name] = param.detach().to("cpu", copy=True)
            if self.world.main and not trainable_only:
                sd.update(
                    {
                        k: v.detach().cpu()
                        for k, v in self.module.named_buffers()
                        if k in self.module.state_dict()
                    }
                )
            return sd
        return replicated_state_dict(self.module, self.world, trainable_only)


def make_engine(model, cfg: TrainConfig, world: World, total_steps: int,
                weights_from: str | None = None):  # fmt: skip
    if cfg.strategy.startswith("zero"):
        return DeepSpeedEngine(model, cfg, world, total_steps)
    return TorchEngine(model, cfg, world, total_steps, weights_from)
