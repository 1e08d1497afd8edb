"""Training arguments: one dataclass, YAML recipes, command-line overrides.

Flag names follow FastChat and Hugging Face (`--model_name_or_path`, `--data_path`,
`--per_device_train_batch_size`, ...), so FastChat's commands carry over; the few FastChat flags
whose meaning changed are mapped in FASTCHAT_FLAGS, in this one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload")
OPTIMIZERS = ("adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    # model and data; with neither given, the tiny model trains on the embedded identity data
    model_name_or_path: str | None = None
    data_path: str | None = None
    template: str | dict = "vicuna_v1.1"  # a name, a YAML/JSON file, or a dict of template fields
    model_max_length: int = 2048
    max_source_length: int | None = None  # per prompt turn (QLoRA recipes cap these separately)
    max_target_length: int | None = None  # per reply
    output_dir: str = "runs/vicuna"
    overwrite_output_dir: bool = False
    # optimisation (FastChat's Vicuna defaults)
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 16
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"  # or paged_adamw_32bit, paged_adamw_8bit, adamw_8bit (bitsandbytes)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seed: int = 42
    # precision and memory
    bf16: bool = False
    tf32: bool = False
    gradient_checkpointing: bool = False
    strategy: str = "ddp"
    deepspeed: str | None = None  # a DeepSpeed JSON; default: ds_configs/<strategy>.json
    # batches
    group_by_length: bool = True
    packing: bool = False  # several conversations per row, never attending to each other
    train_on_inputs: bool = False
    num_proc: int = 1
    # checkpoints and logs
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 1
    report_to: str = "tensorboard"  # or "none"
    peak_tflops: float | None = (
        None  # per device, for the MFU estimate; guessed from the GPU when unset
    )
    cache_dir: str | None = None

    def check(self) -> TrainConfig:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"optim {self.optim!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.optim != "adamw_torch" and self.strategy.startswith("zero"):
            raise ConfigError(
                f"optim {self.optim} is a bitsandbytes optimizer; ZeRO needs adamw_torch"
            )
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "model_max_length",
            "save_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set max_steps or num_train_epochs to a positive value")
        for name in ("model_name_or_path", "data_path", "deepspeed"):
            value = getattr(self, name)  # data_path may list several files: a.json,b.jsonl
            for path in value.split(",") if name == "data_path" and value else [value]:
                if path and not Path(path).exists():
                    raise ConfigError(f"{name}: {path} does not exist")
        return self

    def run_fingerprint(self) -> str:
        """What makes two runs the same run (for resuming into an output directory)."""
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUMABLE_CHANGES}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# Fields a relaunch may change without making it another run.
RESUMABLE_CHANGES = {"save_steps", "save_total_limit", "logging_steps", "report_to", "overwrite_output_dir",
                     "num_proc", "cache_dir", "peak_tflops", "max_steps", "num_train_epochs"}  # fmt: skip

# FastChat / HF flags with another name or no meaning here: flag -> (field or None, why).
FASTCHAT_FLAGS = {
    "fsdp": ("strategy", "`--fsdp 'full_shard auto_wrap'` means strategy fsdp"),
    "fsdp_transformer_layer_cls_to_wrap": (None, "FSDP wraps the model's own decoder layer class"),
    "lazy_preprocess": (None, "the training set is always built once and cached"),
    "no_cuda": ("use_cpu", "renamed in transformers 5"),
    "use_cpu": (None, "no GPU -> CPU processes on gloo, automatically"),
    "evaluation_strategy": (None, "evaluation is `python -m recipes.eval` (not part of training)"),
    "eval_strategy": (None, "see evaluation_strategy"),
    "save_strategy": (None, "checkpoints every save_steps"),
    "fp16": (None, "fp16 is not supported; use --bf16 True"),
}


def _parse_value(raw: str, current, name: str):
    if isinstance(current, bool) or raw.lower() in ("true", "false"):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{name} expects True or False, got {raw!r}")
    if raw.lower() in ("none", "null") and not isinstance(current, str):
        return None  # a str setting keeps "none" as its value (--quantization none)
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _types(cls=TrainConfig) -> dict:
    return {f.name: f for f in fields(cls)}


def _coerce(name: str, value, cls=TrainConfig):
    current = getattr(cls(), name)
    if name == "template" and isinstance(value, dict):
        return value
    if isinstance(value, str):
        value = _parse_value(value, current, name)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if value is not None and current is not None and type(value) is not type(current):
        raise ConfigError(f"{name} expects {type(current).__name__}, got {value!r}")
    return value


def _unknown(name: str, source: str, cls=TrainConfig) -> ConfigError:
    close = difflib.get_close_matches(name, list(_types(cls)), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{source}: unknown key {name!r}{hint}")


def load_config(argv: list[str] | None = None, cls: type = TrainConfig):
    """`--config FILE` (a YAML recipe) then `--key value` / `--key=value` overrides, into `cls`
    (TrainConfig or a recipe's subclass of it).

    Returns the config and notes about FastChat flags that were mapped or ignored.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pairs, notes = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --key value")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val, i = argv[i + 1], i + 1
            else:
                val = "True"  # a bare flag
        pairs.append((key.replace("-", "_"), val))
        i += 1
    values = {}
    config_path = next((v for k, v in pairs if k == "config"), None)
    if config_path:
        path = Path(config_path)
        if not path.exists() and (CONFIG_DIR / path).exists():
            path = CONFIG_DIR / path
        if not path.exists():
            raise ConfigError(f"config file {config_path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        for k, v in loaded.items():
            if k not in _types(cls):
                raise _unknown(k, str(path), cls)
            values[k] = _coerce(k, v, cls)
    for key, val in pairs:
        if key in (
            "config",
            "local_rank",
        ):  # the deepspeed launcher adds --local_rank (also in env)
            continue
        if key in FASTCHAT_FLAGS:
            target, why = FASTCHAT_FLAGS[key]
            if key == "fsdp":
                values["strategy"] = (
                    "fsdp" if "full_shard" in val or "shard_grad_op" in val else "ddp"
                )
            elif key == "fp16" and _parse_value(val, False, key):
                raise ConfigError(f"--fp16: {why}")
            notes.append(f"--{key}: {why}")
            continue
        if key not in _types(cls):
            raise _unknown(key, "command line", cls)
        values[key] = _coerce(key, val, cls)
    if values.get("deepspeed") and "strategy" not in values:
        values["strategy"] = strategy_of_deepspeed_config(values["deepspeed"])
    return cls(**values).check(), notes


def strategy_of_deepspeed_config(path: str) -> str:
    cfg = json.loads(Path(path).read_text())
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage == 3:
        return "zero3_offload" if zero.get("offload_param", {}).get("device") == "cpu" else "zero3"
    if stage in (1, 2):
        return "zero2"
    raise ConfigError(f"{path}: ZeRO stage {stage} is not supported (use 2 or 3)")
