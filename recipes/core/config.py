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

STRATEGIES = (
    "single",
    "ddp",
    "fsdp",
    "fsdp_grad_op",
    "fsdp_offload",
    "zero2",
    "zero3",
    "zero3_offload",
)
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "none")
OPTIMIZERS = ("adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


# ZeRO buffer sizes that scale with the model, as Hugging Face's integration fills them (in
# elements): DeepSpeed's fixed defaults (reduce bucket 5e8) cost GBs per rank on any model.
ZERO_AUTO_SIZES = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


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
    sharded_load: bool = True  # FSDP2 / ZeRO-3: no rank ever holds the whole model
    # batches
    group_by_length: bool = True
    packing: bool = False  # several conversations per row, never attending to each other
    packing_row_tokens: int | None = None  # cap per packed row; default: the longest conversation
    train_on_inputs: bool = False
    num_proc: int = 1
    # speed (attention implementation, loss, compilation)
    # chunked loss: logits only where labels are set, this many rows at a time; 0: transformers'
    loss_chunk_size: int = 512
    attn_implementation: str = "auto"  # sdpa, sdpa_packed, flex_attention, ... (attention.py)
    compile: bool = False  # torch.compile each decoder layer
    use_liger_kernel: bool = False  # Liger's fused kernels (needs liger-kernel and a GPU)
    # robustness
    max_bad_steps: int = 0  # non-finite loss/grad steps to skip (not apply) before stopping the run
    # checkpoints and logs
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 1
    report_to: str = "tensorboard"  # any of tensorboard,wandb,mlflow,trackio (comma-separated), or none
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
        import math

        for name in (
            "logging_steps",
            "num_proc",
            "max_source_length",
            "max_target_length",
            "packing_row_tokens",
        ):
            value = getattr(self, name, None)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        inf = math.inf
        for name, low, high in (("learning_rate", 0, inf), ("weight_decay", 0, inf),
                                ("warmup_ratio", 0, 1), ("max_grad_norm", 0, inf),
                                ("adam_beta1", 0, 1), ("adam_beta2", 0, 1),
                                ("adam_epsilon", 0, inf),
                                ("num_train_epochs", -inf, inf)):  # fmt: skip
            value = float(getattr(self, name))
            if not (math.isfinite(value) and low <= value <= high):
                bounds = f" in [{low}, {high}]" if high < inf else f" >= {low}" * (low > -inf)
                raise ConfigError(f"{name} must be a finite number{bounds}, got {value}")
        trackers = [t.strip() for t in str(self.report_to).split(",") if t.strip()]
        if not trackers or set(trackers) - set(TRACKERS) or ("none" in trackers and len(trackers) > 1):
            raise ConfigError(f"report_to {self.report_to!r}: give none or any of "
                              f"{', '.join(TRACKERS[:-1])} (comma-separated)")  # fmt: skip
        is_file_name = str(self.template).endswith((".yaml", ".yml", ".json"))
        if isinstance(self.template, str) and not is_file_name:
            from fastchat_data.templates import CHAT_TEMPLATE, TEMPLATES

            names = ", ".join([*TEMPLATES, CHAT_TEMPLATE])
            if self.template not in (*TEMPLATES, CHAT_TEMPLATE):
                raise ConfigError(
                    f"template {self.template!r} is not one of {names}"
                    " (or a YAML/JSON file of template fields)"
                )
        elif isinstance(self.template, str) and not Path(self.template).is_file():
            raise ConfigError(f"template: {self.template} does not exist")
        for name in ("model_name_or_path", "data_path", "deepspeed"):
            value = getattr(self, name)  # data_path may list several files: a.json,b.jsonl
            for path in value.split(",") if name == "data_path" and value else [value]:
                if path and not Path(path).exists():
                    raise ConfigError(f"{name}: {path} does not exist")
                if not path:
                    continue
                if name == "model_name_or_path" and not (Path(path) / "config.json").is_file():
                    why = "is a file" if Path(path).is_file() else "is a folder without a model"
                    raise ConfigError(
                        f"{name}: {path} {why}; give a Hugging Face model folder (with config.json)"
                    )
                if name != "model_name_or_path" and Path(path).is_dir():
                    raise ConfigError(f"{name}: {path} is a directory; give a file")
        from transformers import SchedulerType  # last: importing transformers takes seconds

        schedulers = [t.value for t in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise ConfigError(
                f"lr_scheduler_type {self.lr_scheduler_type!r} is not one of "
                + ", ".join(schedulers)
            )
        from .attention import IMPLEMENTATIONS  # here: attention.py imports this module

        if self.attn_implementation not in IMPLEMENTATIONS:
            raise ConfigError(f"attn_implementation {self.attn_implementation!r} is not one of "
                              f"{', '.join(IMPLEMENTATIONS)}")  # fmt: skip
        if self.loss_chunk_size < 0:
            raise ConfigError(f"loss_chunk_size must be 0 (transformers' loss) or positive, "
                              f"got {self.loss_chunk_size}")  # fmt: skip
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
    "fsdp": ("strategy", "FastChat's --fsdp options map to a strategy (fsdp_strategy())"),
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
        raise ConfigError(f"{name} expects True or False, got {raw!r}")
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
    # The declared types ("str | None"): a setting whose default is None still has a type.
    names = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "None": type(None)}
    declared = _types(cls)[name].type
    parts = [declared] if isinstance(declared, type) else str(declared).split("|")
    allowed = {p if isinstance(p, type) else names.get(p.strip()) for p in parts}
    if None in allowed:  # an annotation not read here (list[str], ...): the default's type
        allowed = {type(current)} if current is not None else set()
    optional = type(None) in allowed or current is None
    if isinstance(value, str):
        if str in allowed and not (optional and value.lower() in ("none", "null")):
            return value  # a name or a path stays text, even "5" or "true"
        value = _parse_value(value, current, name)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if value is None:
        if not optional:
            raise ConfigError(f"{name} needs a value, got none")
        return None
    if allowed and type(value) not in allowed:
        want = " or ".join(sorted(t.__name__ for t in allowed if t is not type(None)))
        hint = " (several files: one comma-separated string)" if isinstance(value, list) else ""
        raise ConfigError(f"{name} expects {want}, got {value!r}{hint}")
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
        loaded = read_structured(path, yaml.safe_load, "YAML")
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
                values["strategy"] = fsdp_strategy(val)
                notes.append(f"--fsdp {val!r}: strategy {values['strategy']}")
                continue
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


def read_structured(path: Path, parse, kind: str) -> dict:
    """A YAML or JSON file that must hold a mapping; anything else is one clear ConfigError."""
    if not Path(path).exists():
        raise ConfigError(f"{path} does not exist")
    try:
        loaded = parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: malformed {kind}: {str(e).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, found {type(loaded).__name__}")
    return loaded


def fsdp_strategy(options: str) -> str:
    """FastChat's / HF Trainer's `--fsdp "full_shard auto_wrap offload"` as a camelid strategy.
    Every word either maps or is an error: a dropped option would change memory silently."""
    words = options.replace(",", " ").split()
    unknown = set(words) - {"full_shard", "shard_grad_op", "offload", "auto_wrap", "no_shard"}
    if unknown or not words:
        raise ConfigError(f"--fsdp {options!r}: unsupported option(s) {', '.join(sorted(unknown)) or '(none)'}; "
                          "use full_shard or shard_grad_op, with offload and auto_wrap (hybrid "
                          "sharding is not supported)")  # fmt: skip
    if "no_shard" in words:
        if len(set(words) - {"no_shard", "auto_wrap"}):
            raise ConfigError(
                f"--fsdp {options!r}: no_shard cannot be combined with sharding options"
            )
        return "ddp"
    if "full_shard" in words and "shard_grad_op" in words:
        raise ConfigError(f"--fsdp {options!r}: full_shard and shard_grad_op exclude each other")
    if "offload" in words:
        if "shard_grad_op" in words:
            raise ConfigError(f"--fsdp {options!r}: offload is supported with full_shard only "
                              "(strategy fsdp_offload)")  # fmt: skip
        return "fsdp_offload"
    if "shard_grad_op" in words:
        return "fsdp_grad_op"
    if "full_shard" in words:
        return "fsdp"
    raise ConfigError(f"--fsdp {options!r}: say full_shard or shard_grad_op")  # auto_wrap alone


def strategy_of_deepspeed_config(path: str) -> str:
    cfg = read_structured(Path(path), json.loads, "JSON")
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage == 3:
        return "zero3_offload" if zero.get("offload_param", {}).get("device") == "cpu" else "zero3"
    if stage in (1, 2):
        return "zero2"
    raise ConfigError(f"{path}: ZeRO stage {stage} is not supported (use 2 or 3)")
