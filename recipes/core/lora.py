"""Parameter-efficient fine-tuning: a 4-bit / 8-bit / full-precision base with a PEFT adapter
(LoRA, prompt tuning or P-tuning), adapter-only checkpoints, and adapter loading with checks.

Everything here goes through bitsandbytes and peft's own mechanisms (BitsAndBytesConfig,
prepare_model_for_kbit_training, get_peft_model, save_pretrained); camelid adds the checks
that turn their deep errors into one clear message before training. The adapter as a model
form (its engine, checkpoints and export) is recipes/core/model_form.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError
from .engines import ADAPTER_WEIGHTS
from .loading import enable_activation_checkpointing


def load_base(
    path: str,
    device: torch.device,
    *,
    quantization: str = "none",
    double_quant: bool = True,
    bf16: bool = False,
    attention: dict | None = None,
    from_pretrained=None,
):
    """The base model, quantized by bitsandbytes (`quantization` nf4, fp4 or int8) or not,
    placed on `device`; `attention`: attention_kwargs() for from_pretrained. `from_pretrained`:
    the loader (path, **kwargs), AutoModelForCausalLM's unless an objective brings its own
    model class (the reward model's score head)."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from_pretrained = from_pretrained or AutoModelForCausalLM.from_pretrained
    dtype = torch.bfloat16 if bf16 else torch.float32
    attention = attention or {}
    if quantization == "none":
        return from_pretrained(path, dtype=dtype, **attention)
    config = AutoConfig.from_pretrained(path)
    existing = getattr(config, "quantization_config", None)
    if existing:
        method = (
            existing.get("quant_method") if isinstance(existing, dict) else existing.quant_method
        )
        raise ConfigError(
            f"{path} is already quantized ({method}); bitsandbytes cannot quantize it again: "
            "use its full-precision base, or --quantization none"
        )
    if quantization == "int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        model = from_pretrained(
            path, quantization_config=bnb, device_map={"": device}, dtype=dtype, **attention
        )
    except (ValueError, RuntimeError, ImportError) as e:
        raise ConfigError(f"bitsandbytes cannot quantize {path}: {e}") from None
    if not quantized_modules(model):
        raise ConfigError(
            f"bitsandbytes found no linear layer to quantize in {path} "
            f"({type(model).__name__}); train it with --quantization none"
        )
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
    "all-linear" means, as in QLoRA. A sequence classifier's head (score) is no LoRA target
    either: peft trains it whole (SEQ_CLS's modules_to_save)."""
    head = model.get_output_embeddings()  # bitsandbytes' layers subclass torch.nn.Linear
    return sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and n not in SEQ_CLS_HEADS
        }
    )


# a sequence classifier's head, trained whole under a SEQ_CLS adapter and saved with it
SEQ_CLS_HEADS = ("score", "classifier")


def peft_config(cfg, model, task: str = "CAUSAL_LM"):
    """The adapter's peft config; `task`: peft's TaskType name (SEQ_CLS for a reward model:
    its score head is new, so it trains whole beside the LoRA layers and is saved with them)."""
    from peft import LoraConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    if cfg.peft_method == "prompt_tuning":
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens
        )
    if cfg.peft_method == "p_tuning":
        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=cfg.num_virtual_tokens,
            encoder_hidden_size=model.config.hidden_size,
        )
    available = linear_module_names(model)
    if cfg.lora_target_modules == "all-linear":
        targets = available
    else:
        targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
        missing = [t for t in targets if t not in available]
        if missing:
            raise ConfigError(
                f"lora_target_modules: {', '.join(missing)} not in {type(model).__name__}; "
                f"its linear layers are {', '.join(available)}"
            )
    heads = [n for n, _ in model.named_children() if n in SEQ_CLS_HEADS]
    return LoraConfig(
        task_type=TaskType[task],
        modules_to_save=heads if task == "SEQ_CLS" else None,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
    )


def add_adapter(model, cfg, task: str = "CAUSAL_LM"):
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
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    return get_peft_model(model, peft_config(cfg, model, task))


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


def read_adapter_config(adapter: str | Path):
    """The adapter's peft config; a folder that is not an adapter is a clear error."""
    from peft import PeftConfig

    if not (Path(adapter) / "adapter_config.json").exists():
        raise ConfigError(f"{adapter} is not an adapter folder (no adapter_config.json)")
    try:
        return PeftConfig.from_pretrained(str(adapter))
    except (ValueError, TypeError, KeyError, OSError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(
            f"{Path(adapter) / 'adapter_config.json'}: not a peft config ({e})"
        ) from None


def load_adapter(model, adapter: str | Path):
    """`model` with the adapter at `adapter` attached (for eval, chat, merge). A base that does
    not match the adapter (another architecture or size) is a clear error, not a shape
    mismatch deep inside peft."""
    from peft import PeftModel
    from safetensors import SafetensorError, safe_open

    adapter = Path(adapter)
    config = read_adapter_config(adapter)
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"{adapter} is not an adapter folder (no {ADAPTER_WEIGHTS})")
    try:
        weights = safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt")
    except SafetensorError as e:
        raise ConfigError(f"{adapter / ADAPTER_WEIGHTS}: not a safetensors file ({e})") from None
    modules = dict(model.named_modules())
    base_arch = type(model).__name__
    with weights as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            if ".lora_A" in key or ".lora_B" in key:
                name = key.split(".lora_")[0].removeprefix("base_model.model.")
                layer = modules.get(name)
                if layer is None:
                    raise ConfigError(
                        f"adapter {adapter} was trained on a model with a layer {name}, "
                        f"which {base_arch} ({model.name_or_path}) lacks"
                    )
                fan_in, fan_out = layer.in_features, layer.out_features
                want = shape[1] if ".lora_A" in key else shape[0]
                have = fan_in if ".lora_A" in key else fan_out
                if want != have:
                    raise ConfigError(
                        f"adapter {adapter} does not fit {model.name_or_path}: layer {name} "
                        f"has {have} features there, the adapter expects {want} "
                        f"(trained on {config.base_model_name_or_path})"
                    )
            elif "prompt_embeddings" in key and shape[-1] != model.config.hidden_size:
                raise ConfigError(
                    f"adapter {adapter} has prompts of width {shape[-1]}; {model.name_or_path} "
                    f"has hidden size {model.config.hidden_size}"
                )
    return PeftModel.from_pretrained(model, str(adapter))
