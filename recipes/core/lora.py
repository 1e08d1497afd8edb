"""Parameter-efficient fine-tuning: a 4-bit / 8-bit / full-precision base with a PEFT adapter
(LoRA, prompt tuning or P-tuning), adapter-only checkpoints, and adapter loading with checks.

Everything here goes through bitsandbytes and peft's own mechanisms (BitsAndBytesConfig,
prepare_model_for_kbit_training, get_peft_model, save_pretrained); camelid adds the checks
that turn their deep errors into one clear message before training, and the gather that
makes an adapter saved under ZeRO-3 hold real weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fastchat_data.io import save_tokenizer

from .checkpoint import RUN_INFO, load_json_state, save_json_state
from .config import ConfigError, TrainConfig, option
from .distributed import TorchEngine, World, make_engine

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
PEFT_METHODS = ("lora", "prompt_tuning", "p_tuning")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class QLoraConfig(TrainConfig):
    """TrainConfig plus the adapter's settings; defaults are the QLoRA reference recipe's
    (NTU ADL 2023 HW3 on top of artidoro/qlora)."""

    quantization: str = option(
        "nf4", "the base's weights: nf4 or fp4 (4-bit), int8, none (plain LoRA on a full base)"
    )
    double_quant: bool = option(True, "4-bit: quantize the quantization constants too")
    peft_method: str = option("lora", "the adapter: lora, prompt_tuning or p_tuning")
    lora_r: int = option(64, "LoRA rank")
    lora_alpha: int = option(16, "LoRA scale numerator (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_target_modules: str = option(
        "all-linear", "layers that get LoRA: all-linear, or comma-separated names: q_proj,v_proj"
    )
    num_virtual_tokens: int = option(20, "prompt tuning / P-tuning: virtual tokens prepended")
    # the reference's optimisation
    optim: str = "paged_adamw_32bit"
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 0.3
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    max_steps: int = 250
    max_source_length: int | None = 256
    max_target_length: int | None = 128
    gradient_checkpointing: bool = True
    bf16: bool = option(
        default_factory=lambda: torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        help="bf16 mixed precision (True on GPUs that support it; fp16 is not supported)",
    )
    save_steps: int = 50
    output_dir: str = "runs/qlora"

    def check(self) -> QLoraConfig:
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}"
            )
        if self.peft_method not in PEFT_METHODS:
            raise ConfigError(
                f"peft_method {self.peft_method!r} is not one of {', '.join(PEFT_METHODS)}"
            )
        if self.strategy.startswith("fsdp"):
            raise ConfigError(
                "adapters train with strategy ddp (one process per GPU) or zero2/zero3"
            )
        if self.quantization != "none" and self.strategy.startswith("zero"):
            raise ConfigError(
                f"a {self.quantization} base trains with strategy ddp; ZeRO needs --quantization none"
            )
        if self.peft_method != "lora" and self.strategy.startswith("zero"):
            raise ConfigError(f"{self.peft_method} trains with strategy ddp; ZeRO is for LoRA")
        if self.peft_method != "lora" and self.packing:
            raise ConfigError(
                f"{self.peft_method} prepends virtual tokens to each row: it cannot pack rows"
            )
        super().check()
        return self


def load_base(path: str, cfg: QLoraConfig, device: torch.device):
    """The base model, quantized by bitsandbytes as configured, placed on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from .attention import attention_kwargs

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    attention = attention_kwargs(cfg)  # --attn_implementation
    if cfg.quantization == "none":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attention)
    config = AutoConfig.from_pretrained(path)
    existing = getattr(config, "quantization_config", None)
    if existing:
        method = (
            existing.get("quant_method") if isinstance(existing, dict) else existing.quant_method
        )
        raise ConfigError(f"{path} is already quantized ({method}); bitsandbytes cannot quantize it again: "
                          "use its full-precision base, or --quantization none")  # fmt: skip
    if cfg.quantization == "int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
                                 bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=dtype)  # fmt: skip
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb, device_map={"": device}, dtype=dtype, **attention
        )
    except (ValueError, RuntimeError, ImportError) as e:
        raise ConfigError(f"bitsandbytes cannot quantize {path}: {e}") from None
    if not quantized_modules(model):
        raise ConfigError(f"bitsandbytes found no linear layer to quantize in {path} "
                          f"({type(model).__name__}); train it with --quantization none")  # fmt: skip
    return model


def quantized_modules(model) -> list[str]:
    import bitsandbytes as bnb

    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)
    ]


def linear_module_names(model) -> list[str]:
    """Names (last component) of the model's linear layers, the output head excluded: what
    "all-linear" means, as in QLoRA."""
    head = model.get_output_embeddings()  # bitsandbytes' layers subclass torch.nn.Linear
    return sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head
        }
    )


def peft_config(cfg: QLoraConfig, model):
    from peft import LoraConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    if cfg.peft_method == "prompt_tuning":
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens
        )
    if cfg.peft_method == "p_tuning":
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                                   encoder_hidden_size=model.config.hidden_size)  # fmt: skip
    available = linear_module_names(model)
    if cfg.lora_target_modules == "all-linear":
        targets = available
    else:
        targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
        missing = [t for t in targets if t not in available]
        if missing:
            raise ConfigError(f"lora_target_modules: {', '.join(missing)} not in {type(model).__name__}; "
                              f"its linear layers are {', '.join(available)}")  # fmt: skip
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=targets, bias="none")  # fmt: skip


def add_adapter(model, cfg: QLoraConfig):
    """A trainable adapter on a frozen base. Gradient checkpointing needs the inputs to
    require grad when the embeddings are frozen: both peft calls below see to it."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    ckpt_kwargs = {"use_reentrant": False}
    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs,
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    return get_peft_model(model, peft_config(cfg, model))


class AdapterEngine(TorchEngine):
    """1 process or DDP training an adapter. Checkpoints hold the adapter (safetensors) and
    the optimizer and scheduler state, written once by rank 0: under DDP every rank holds
    the same; the frozen (possibly quantized) base is never written."""

    def save(self, path: Path) -> None:
        if self.world.main:
            self.module.save_pretrained(path / "adapter", safe_serialization=True)
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")  # read weights_only
            save_json_state(self.scheduler.state_dict(), path / "scheduler.json")

    def load(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(path / "adapter" / ADAPTER_WEIGHTS), device=str(self.world.device))
        set_peft_model_state_dict(self.module, weights)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.world.device,
                                                  weights_only=True))  # fmt: skip
        self.scheduler.load_state_dict(load_json_state(path / "scheduler.json"))


def make_adapter_engine(model, cfg: QLoraConfig, world: World, total_steps: int):
    if cfg.strategy.startswith("zero"):
        return make_engine(model, cfg, world, total_steps)  # DeepSpeed's own sharded checkpoints
    return AdapterEngine(model, cfg, world, total_steps)


def verify_adapter(folder: Path) -> dict:
    """An adapter folder holds real weights: tensors, none empty, none NaN. Returns a summary."""
    from safetensors import safe_open

    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        raise RuntimeError(f"{folder}: no {ADAPTER_WEIGHTS}")
    tensors, numel, nonzero = 0, 0, 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.numel() == 0 or not torch.isfinite(t.float()).all():
                raise RuntimeError(
                    f"{weights}: tensor {key} is empty or not finite {tuple(t.shape)}"
                )
            tensors, numel, nonzero = tensors + 1, numel + t.numel(), nonzero + int((t != 0).sum())
    if tensors == 0 or nonzero == 0:
        raise RuntimeError(f"{weights}: holds no weights ({tensors} tensors, all zero)")
    return {"tensors": tensors, "parameters": numel, "bytes": weights.stat().st_size}


def export_adapter(
    engine, world: World, tokenizer, out_dir: Path, info: dict | None = None
) -> Path | None:
    """The trained adapter as a plain peft folder (adapter_config.json, safetensors) plus the
    tokenizer, written atomically by rank 0 and verified to hold real weights. Under ZeRO-3
    the adapter's parameters are gathered first, one tensor at a time."""
    state_dict = engine.full_state_dict(trainable_only=True)  # collective under ZeRO-3
    if world.main:
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        info = dict(info or {})
        if info.get("template") is not None:  # the tokenizer carries the training template
            from .generate import save_for_inference

            info.update(save_for_inference(tokenizer, info["template"], tmp))
        else:
            save_tokenizer(tokenizer, tmp)
        summary = verify_adapter(tmp)
        (tmp / RUN_INFO).write_text(
            json.dumps({**info, "weights": summary}, indent=2, ensure_ascii=False)
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    world.barrier()
    return out_dir if world.main else None


def read_adapter_config(adapter: str | Path):
    """The adapter's peft config; a folder that is not an adapter is a clear error."""
    from peft import PeftConfig

    if not (Path(adapter) / "adapter_config.json").exists():
        raise ConfigError(f"{adapter} is not an adapter folder (no adapter_config.json)")
    return PeftConfig.from_pretrained(str(adapter))


def load_adapter(model, adapter: str | Path):
    """`model` with the adapter at `adapter` attached (for eval, chat, merge). A base that does
    not match the adapter (another architecture or size) is a clear error, not a shape
    mismatch deep inside peft."""
    from peft import PeftModel
    from safetensors import safe_open

    adapter = Path(adapter)
    config = read_adapter_config(adapter)
    modules = dict(model.named_modules())
    base_arch = type(model).__name__
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            if ".lora_A" in key or ".lora_B" in key:
                name = key.split(".lora_")[0].removeprefix("base_model.model.")
                layer = modules.get(name)
                if layer is None:
                    raise ConfigError(f"adapter {adapter} was trained on a model with a layer {name}, "
                                      f"which {base_arch} ({model.name_or_path}) lacks")  # fmt: skip
                fan_in, fan_out = layer.in_features, layer.out_features
                want = shape[1] if ".lora_A" in key else shape[0]
                have = fan_in if ".lora_A" in key else fan_out
                if want != have:
                    raise ConfigError(f"adapter {adapter} does not fit {model.name_or_path}: layer {name} "
                                      f"has {have} features there, the adapter expects {want} "
                                      f"(trained on {config.base_model_name_or_path})")  # fmt: skip
            elif "prompt_embeddings" in key and shape[-1] != model.config.hidden_size:
                raise ConfigError(f"adapter {adapter} has prompts of width {shape[-1]}; {model.name_or_path} "
                                  f"has hidden size {model.config.hidden_size}")  # fmt: skip
    return PeftModel.from_pretrained(model, str(adapter))
