"""The training engines: one interface over single-process, DDP, FSDP2 and DeepSpeed ZeRO, built
from the strategy's declared attributes (recipes/core/parallel.py), never from its name.

Why not HF Trainer or accelerate: on CPU both silently fall back to DDP when asked for FSDP,
and Trainer trains each rank alone unless `use_cpu=True`. camelid drives torch's FSDP2
(`fully_shard`) and `deepspeed.initialize` directly, so the code that runs on gloo here is the
code that runs on NCCL on GPUs; no library internals are patched.

Loss scaling: each micro-batch's loss is its token-loss sum divided by the number of trained
tokens in the whole global batch (all micro-batches, all ranks). Summed over micro-batches and
ranks that is exactly the global batch's mean token loss, whatever the split; the engines
undo the averaging their gradient reduction does, so every strategy takes the same step.

Checkpoint state goes through a `StateIO` chosen by the engine and the model form: DCP shards
(torch engines, full model), the adapter and its optimizer (torch engines, adapter), or
DeepSpeed's own files.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import torch

from .config import ConfigError
from .ds_config import deepspeed_config
from .loading import fill_sharded, load_model
from .logging import PHASES
from .run_folder import CheckpointFolder
from .safe_load import dcp_load, deepspeed_loads_weights_only
from .world import World

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def decoder_layer_classes(model) -> set[type]:
    """The model's own decoder-layer classes, as the model declares them (`_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(
            f"{type(model).__name__} declares no decoder layer class (_no_split_modules) to "
            "shard by"
        )
    return classes


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on norms and biases (as HF Trainer does). A ZeRO-3
    parameter built partitioned is an empty vector: its shape is ds_shape."""

    def matrix(p) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if p.requires_grad and matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not matrix(p)]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # an adapter may have no vectors to train; ZeRO drops empty groups, the scheduler would not
    return [g for g in groups if g["params"]]


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """torch AdamW, or bitsandbytes' paged / 8-bit AdamW (QLoRA's memory savers; without CUDA
    bitsandbytes runs them unpaged)."""
    kwargs = dict(
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon
    )
    if cfg.optim == "adamw_torch":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)
    import bitsandbytes as bnb

    cls = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }[cfg.optim]
    return cls(param_groups(model, cfg.weight_decay), **kwargs)


def make_scheduler(optimizer, cfg, total_steps: int):
    """transformers' schedule, with Trainer's warm-up: ratio x steps rounded up
    (TrainingArguments.get_warmup_steps), so 0.03 of 100 steps warms up over 3, not 2."""
    from transformers import get_scheduler

    warmup_steps = math.ceil(total_steps * cfg.warmup_ratio)
    return get_scheduler(cfg.lr_scheduler_type, optimizer, warmup_steps, total_steps)


def save_json_state(state: dict, path: Path) -> None:
    """A scheduler's state_dict (numbers and lists) as JSON."""
    path.write_text(json.dumps(state, indent=1))


def load_json_state(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def count_nonfinite(tensors) -> int:
    """How many of these (local) tensors hold a NaN or an infinity. Each tensor's min and max
    (NaN propagates through both, an infinity is one of them) in one pass with no temporary,
    and one host sync for all: a mask per tensor (`isfinite(t).all()`) cost ~15x as much."""
    local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
    extremes = [torch.stack(torch.aminmax(t)) for t in local if t.numel() and t.is_floating_point()]
    if not extremes:
        return 0
    return int((~torch.isfinite(torch.stack(extremes))).any(dim=1).sum())


# ---------------------------------------------------------------------------- checkpoint state


class DcpState:
    """The whole model's and the optimizer's state as torch distributed checkpoint shards
    (every rank writes its own), and the scheduler as JSON."""

    def save(self, engine, folder: CheckpointFolder) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(engine.module, engine.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder.dcp))
        if engine.world.main:
            save_json_state(engine.scheduler.state_dict(), folder.scheduler)

    def load(self, engine, folder: CheckpointFolder) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(engine.module, engine.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp_load(state, folder.dcp)  # the restricted reader (recipes/core/safe_load.py)
        set_state_dict(
            engine.module,
            engine.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
        engine.scheduler.load_state_dict(load_json_state(folder.scheduler))


class AdapterState:
    """An adapter run: the adapter (safetensors), its optimizer and the scheduler, written once
    by rank 0 (every rank holds the same); the frozen (possibly quantized) base never is."""

    def save(self, engine, folder: CheckpointFolder) -> None:
        if engine.world.main:
            engine.module.save_pretrained(folder.adapter, safe_serialization=True)
            torch.save(engine.optimizer.state_dict(), folder.optimizer)  # read weights_only
            save_json_state(engine.scheduler.state_dict(), folder.scheduler)

    def load(self, engine, folder: CheckpointFolder) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        device = str(engine.world.device)
        set_peft_model_state_dict(
            engine.module, load_file(str(folder.adapter / ADAPTER_WEIGHTS), device=device)
        )
        optimizer = torch.load(folder.optimizer, map_location=device, weights_only=True)
        engine.optimizer.load_state_dict(optimizer)
        engine.scheduler.load_state_dict(load_json_state(folder.scheduler))


# ---------------------------------------------------------------------------- moving state

MOMENTS = ("exp_avg", "exp_avg_sq")


def fitted(ckpt: CheckpointFolder, name: str, shape, *, tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's saved value in the shape this model gives it, or one line saying why not."""
    shape = torch.Size(shape)
    if tensor.numel() != shape.numel():
        raise ConfigError(
            f"{ckpt.path}: {name} has {tensor.numel()} values, this model's has "
            f"{shape.numel()}: not a checkpoint of this model"
        )
    return tensor.reshape(shape)


class DcpParams:
    """A ParamSource: a torch engine's DCP checkpoint seen parameter by parameter (full fp32
    value, AdamW moments, by full name), each rank reading what it asks for on its own."""

    def __init__(self, folder: CheckpointFolder):
        from .safe_load import SafeFileSystemReader

        self.folder = folder
        self.meta = SafeFileSystemReader(folder.dcp).read_metadata().state_dict_metadata

    def _read(self, *path: str) -> torch.Tensor:
        from .safe_load import dcp_load

        key = ".".join(path)
        info = self.meta.get(key)
        if info is None or not hasattr(info, "size"):
            raise ConfigError(
                f"{self.folder.path} holds no tensor {key}: not a full-model checkpoint of "
                "this model"
            )
        tensor = torch.empty(info.size, dtype=info.properties.dtype)
        nested = tensor
        for part in reversed(path):
            nested = {part: nested}
        dcp_load(nested, self.folder.dcp, no_dist=True)
        return tensor

    def tensor(self, name: str, key: str, shape) -> torch.Tensor:
        path = ("model", name) if key == "param" else ("optim", "state", name, key)
        return fitted(self.folder, name, shape, tensor=self._read(*path))

    def step(self) -> float:
        """AdamW's step count (the same for every parameter: skipped steps count for none)."""
        prefix, suffix = "optim.state.", ".step"
        key = next(k for k in self.meta if k.startswith(prefix) and k.endswith(suffix))
        return float(self._read("optim", "state", key[len(prefix) : -len(suffix)], "step"))

    def scheduler(self) -> dict:
        return load_json_state(self.folder.scheduler)


class UniversalParams:
    """A ParamSource: DeepSpeed's universal checkpoint (deepspeed.checkpoint.ds_to_universal of
    a ZeRO checkpoint), one folder per parameter under zero/; read weights-only."""

    def __init__(self, folder: Path, ckpt: CheckpointFolder):
        (self.zero,) = {p.parent.parent for p in Path(folder).rglob("zero/*/fp32.pt")}
        self.ckpt = ckpt

    def tensor(self, name: str, key: str, shape) -> torch.Tensor:
        path = self.zero / name / f"{'fp32' if key == 'param' else key}.pt"
        if not path.is_file():
            raise ConfigError(f"{self.ckpt.path} holds no {key} for {name}: not this model's")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(saved, dict):  # ZeRO-1/2's: the tensor with how its slices were joined
            from deepspeed.checkpoint.constants import PARAM

            saved = saved[PARAM]
        return fitted(self.ckpt, name, shape, tensor=saved)  # (ZeRO-3's are flat)

    def _states(self, name: str) -> dict:
        from .safe_load import deepspeed_loads_weights_only

        with deepspeed_loads_weights_only():
            return torch.load(self.zero / name, map_location="cpu")

    def step(self) -> float:
        # ZeRO-1/2's converter writes each parameter's Adam step beside its moments; ZeRO-3's
        # keeps the optimizer's state dict whole
        steps = sorted(self.zero.glob("*/step.pt"))
        if steps:
            return float(torch.load(steps[0], map_location="cpu", weights_only=True))
        optim = self._states("optimizer_state.pt")["optimizer_state_dict"]
        return float(next(iter(optim["state"].values()))["step"])

    def scheduler(self) -> dict:
        # every rank's model states hold the same scheduler
        model_states = sorted((self.ckpt.deepspeed / "state").glob("*model_states.pt"))[0]
        from .safe_load import deepspeed_loads_weights_only

        with deepspeed_loads_weights_only():
            return torch.load(model_states, map_location="cpu")["lr_scheduler"]


def deepspeed_to_universal(ckpt: CheckpointFolder, out: Path) -> None:
    """DeepSpeed's own converter, its pickles read weights-only (recipes/core/safe_load.py)."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    from .safe_load import deepspeed_loads_weights_only

    args = Namespace(
        input_folder=str(ckpt.deepspeed / "state"),
        output_folder=str(out / "state"),  # (it writes latest_universal beside that folder)
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # ZeRO-1/2 checkpoints must carry the "universal checkpoint info" a client such as
        # Megatron-DeepSpeed writes (its tensor/pipeline-parallel layout). camelid has neither
        # parallelism, so DeepSpeed's default (a version only) is exactly this run's info.
        inject_missing_state=True,
    )
    chatter = io.StringIO()  # its progress bars and prints
    with (
        deepspeed_loads_weights_only(),
        contextlib.redirect_stdout(chatter),
        contextlib.redirect_stderr(chatter),
    ):
        ds_to_universal.main(args)


# ---------------------------------------------------------------------------- torch engines


class TorchEngine:
    """single process, DDP, or FSDP2 (`fully_shard` per decoder layer, then the root), as the
    strategy declares: parameters sharded or not, resharded after forward or kept gathered
    until backward, offloaded to the CPU or not (CPUOffloadPolicy).

    A model on the meta device (recipes/core/loading.py) is sharded first, then this rank's
    shards are materialised and read from `weights_from`."""

    def __init__(
        self,
        model,
        cfg,
        world: World,
        *,
        total_steps: int,
        weights_from: str | None = None,
        state=None,
    ):
        self.cfg, self.world, self.strategy = cfg, world, world.strategy
        self.state = state or DcpState()
        strategy = self.strategy
        on_meta = any(p.is_meta for p in model.parameters())
        if on_meta and not strategy.fsdp:
            raise ConfigError(f"a model on the meta device needs FSDP, not {strategy.name}")
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if on_meta else {}
        if not (on_meta or strategy.offload or getattr(model, "is_quantized", False)):
            model.to(world.device)  # (bitsandbytes placed a quantized model when loading)
        if strategy.fsdp:
            self.module = self.model = self._fully_shard(model)
            if on_meta:
                model.to_empty(device="cpu" if strategy.offload else world.device)
                fill_sharded(model, weights_from, buffers)
            if strategy.offload:  # FSDP moves parameters for compute; buffers must already be there
                for m in model.modules():
                    for name, buf in m.named_buffers(recurse=False):
                        m._buffers[name] = buf.to(world.device)
        elif strategy.multi_process:
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
        self._autocast = cfg.bf16 and not strategy.fsdp  # FSDP2 casts through its policy

    def _fully_shard(self, model):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        world, strategy = self.world, self.strategy
        # over every rank, sequence-parallel ones too (see parallel.py): the ranks sharing a
        # row hold different tokens, their gradients add up like data-parallel ones
        mesh = init_device_mesh(world.device.type, (world.size,))
        if self.cfg.bf16:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=strategy.reshard_after_forward)
        if strategy.offload:
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=world.device.type == "cuda")
        layers = tuple(decoder_layer_classes(model))
        for m in list(model.modules()):
            if isinstance(m, layers):
                fully_shard(m, **kw)
        fully_shard(model, **kw)
        return model

    def forward(self, **batch):
        from .loss import forward_with_loss

        chunk = self.cfg.loss_chunk_size
        with torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=self._autocast):
            return forward_with_loss(self.model, self.module, chunk, **batch)

    def sync_gradients(self, last_micro_step: bool):
        """Reduce gradients across ranks only on the last micro-step of an optimizer step."""
        if self.strategy.fsdp:
            self.model.set_requires_gradient_sync(last_micro_step)
        elif self.model is not self.module and not last_micro_step:
            return self.model.no_sync()  # DDP
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

    def nonfinite_weights(self) -> int:
        """Trainable tensors of this rank's share that hold a NaN or an infinity."""
        return count_nonfinite(p for p in self.module.parameters() if p.requires_grad)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: CheckpointFolder) -> None:
        self.state.save(self, folder)

    def load(self, folder: CheckpointFolder) -> None:
        self.state.load(self, folder)

    def load_params(self, source) -> None:
        """Another engine's checkpoint (a ParamSource: DeepSpeed's files made universal) into
        this one: every rank fills the full state dicts, torch keeps each rank's share."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        # (torch creates AdamW's state, zeros, to have something to fill)
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=opts)
        params = {n for n, p in self.module.named_parameters() if p.requires_grad}
        model_sd = {
            n: source.tensor(n, "param", t.shape) if n in params else t for n, t in model_sd.items()
        }
        step = torch.tensor(source.step())
        for name, state in optim_sd["state"].items():
            moments = {k: source.tensor(name, k, state[k].shape) for k in MOMENTS}
            state.update(moments, step=step.clone())
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=model_sd,
            optim_state_dict=optim_sd,
            options=opts,
        )
        self.scheduler.load_state_dict(source.scheduler())

    def frozen_copy(self, model_path: str) -> torch.nn.Module:
        """The starting model, frozen, to score with (GRPO's KL reference): a whole copy on
        every rank (under FSDP2 too: it is not sharded)."""
        return whole_frozen_copy(model_path, self.cfg, self.world.device)

    def full_state_dict(self, trainable_only: bool = False) -> dict:
        """The whole model (or its trained parameters: an adapter, never under FSDP) on rank 0's
        CPU, gathered layer by layer (never whole on a GPU)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.strategy.fsdp:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.module, options=opts)
        return replicated_state_dict(self.module, self.world, trainable_only)


def whole_frozen_copy(model_path: str, cfg, device: torch.device) -> torch.nn.Module:
    """The model at `model_path` whole on `device`, in eval mode and without gradients."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def replicated_state_dict(module, world: World, trainable_only: bool) -> dict:
    """Every rank holds the whole model (1 process, DDP, ZeRO-2): rank 0 copies it to CPU."""
    if not world.main:
        return {}
    if trainable_only:
        return {n: p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------- DeepSpeed


class DeepSpeedEngine:
    """ZeRO-2 / ZeRO-3 (optionally offloaded) through `deepspeed.initialize`; checkpoints are
    DeepSpeed's own files, read through camelid's restricted loading."""

    def __init__(self, model, cfg, world: World, *, total_steps: int):
        import deepspeed

        self.cfg, self.world, self.strategy = cfg, world, world.strategy
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

    def nonfinite_weights(self) -> int:
        """Trainable tensors of this rank's share (its ZeRO-3 partition) with a NaN or inf."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        return count_nonfinite(getattr(p, "ds_tensor", p) for p in params)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: CheckpointFolder) -> None:
        self.model.save_checkpoint(str(folder.deepspeed), tag="state")

    def load(self, folder: CheckpointFolder) -> None:
        with deepspeed_loads_weights_only():  # DeepSpeed's torch.load(weights_only=False) calls
            load_path, _ = self.model.load_checkpoint(str(folder.deepspeed), tag="state")
        if load_path is None:
            raise ConfigError(f"DeepSpeed found no checkpoint in {folder.deepspeed}")

    def load_params(self, source) -> None:
        """Another engine's or world size's checkpoint (a ParamSource) into ZeRO: one parameter
        at a time, every rank reads its full fp32 value and AdamW moments and keeps its own
        partition; the model's working copy gets the same value."""
        from deepspeed.runtime.zero import GatheredParameters
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zero, base = self.optimizer, self.optimizer.optimizer  # base: torch AdamW
        # ZeRO's flat fp32 partitions (stage 3 / stage 2), whose AdamW state stage 3 creates at
        # the first step only: created here so that the moments can be set
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(
            zero, "single_partition_of_fp32_groups", []
        )
        for flat in flats:
            if "exp_avg" not in base.state[flat]:
                base.state[flat].update(
                    step=torch.tensor(0.0),
                    exp_avg=torch.zeros_like(flat),
                    exp_avg_sq=torch.zeros_like(flat),
                )
        link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-2 maps parameters to their moments after its first step
            link()
        device = self.world.device
        for name, param in self.module.named_parameters():
            if not param.requires_grad:
                continue
            shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3: partitioned
            value = source.tensor(name, "param", shape).to(device)
            safe_set_full_fp32_param(param, value)
            for key in MOMENTS:
                moment = source.tensor(name, key, shape).to(device)
                safe_set_full_optimizer_state(param, moment, key)
            with GatheredParameters([param], modifier_rank=0):  # ZeRO-3: partitioned again
                param.data.copy_(value.to(param.dtype))
        step = source.step()
        for state in base.state.values():
            state["step"] = torch.tensor(step)
        self.model.global_steps = int(step)
        self.scheduler.load_state_dict(source.scheduler())

    def frozen_copy(self, model_path: str) -> torch.nn.Module:
        """The starting model, frozen, to score with (GRPO's KL reference). ZeRO-3: loaded
        partitioned, as the policy is, into a DeepSpeed engine without an optimizer, whose
        hooks gather each layer for its forward (TRL's prepare_deepspeed does the same): no
        rank holds a second whole model. Its forwards are collective, like the policy's.
        ZeRO-2: every rank holds the policy whole, and the copy whole too."""
        if not self.strategy.shards_params:
            return whole_frozen_copy(model_path, self.cfg, self.world.device)
        import deepspeed

        model = load_model(model_path, self.cfg, self.world).requires_grad_(False)
        config = copy.deepcopy(self.ds_config)
        # no optimizer: an offload_optimizer block would have DeepSpeed build one for nothing
        config["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # (DeepSpeed's eval() returns None, not the engine)
        return engine

    def full_state_dict(self, trainable_only: bool = False) -> dict:
        """ZeRO-3: parameters gathered one by one in 16 bit (the model's dtype) onto rank 0's
        CPU; ZeRO-2: every rank holds the whole model already. trainable_only: an adapter's
        parameters, which under ZeRO-3 are partitioned like the rest (a plain state_dict()
        would hold empty placeholders)."""
        if not self.strategy.shards_params:
            return replicated_state_dict(self.module, self.world, trainable_only)
        from deepspeed.runtime.zero import GatheredParameters

        sd = {}
        for name, param in self.module.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            with GatheredParameters([param], modifier_rank=None):  # one tensor at a time
                if self.world.main:
                    sd[name] = param.detach().to("cpu", copy=True)
        if self.world.main and not trainable_only:
            own = self.module.state_dict()
            sd.update({k: v.detach().cpu() for k, v in self.module.named_buffers() if k in own})
        return sd


def make_engine(
    model,
    cfg,
    world: World,
    *,
    total_steps: int,
    weights_from: str | None = None,
    adapter: bool = False,
):
    """The engine the strategy declares; an adapter's checkpoints hold the adapter only."""
    if world.strategy.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, world, total_steps=total_steps)
    state = AdapterState() if adapter else DcpState()
    return TorchEngine(
        model, cfg, world, total_steps=total_steps, weights_from=weights_from, state=state
    )
