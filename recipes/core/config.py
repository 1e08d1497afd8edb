"""A run's settings: sections composed into one config per recipe, YAML recipes, the command line.

Each section is a dataclass of options that belong together (the model, the data, the
optimisation, how processes share the work, the adapter, checkpoints, logging) with its own
checks; an objective adds its own section (DPO's beta). A recipe's config is `compose`d of
sections with the recipe's defaults, not inherited: every option is declared once, and the
composed class is flat, so `--learning_rate` and `cfg.learning_rate` read as in FastChat and
Hugging Face. Flag names follow them (`--model_name_or_path`, `--data_path`,
`--per_device_train_batch_size`, ...); the FastChat flags whose meaning changed are mapped in
FASTCHAT_FLAGS, in this one place.

The command line is the project's one convention (fastchat_data/options.py: HfArgumentParser,
one-line errors); this module adds the YAML recipe under it (`--config FILE`: its values
become the defaults, so `--config X --help` shows them), `--print_config`, and FastChat's
flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Literal

import yaml

from fastchat_data.options import (
    UsageError,
    build_parser,
    convert,
    normalize,
    option,
    type_hints,
    unknown_option,
)

from . import parallel
from .quiet import verbose_option

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(UsageError):
    """A setting that cannot work: one line naming it, exit status 2."""


# ZeRO buffer sizes that scale with the model, as Hugging Face's integration fills them (in
# elements): DeepSpeed's fixed defaults (reduce bucket 5e8) cost GBs per rank on any model.
ZERO_AUTO_SIZES = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}

Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]
Attention = Literal["auto", "sdpa", "sdpa_packed", "flex_attention", "flash_attention_2", "eager"]
Optimizer = Literal["adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"]
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


def _bounded(cfg, name: str, low: float, *, high: float, low_open=False, high_open=False):
    """A finite number within [low, high] (bounds open where asked), or a ConfigError."""
    value = getattr(cfg, name)
    number = float(value)
    ok = math.isfinite(number) and (number > low if low_open else number >= low)
    ok = ok and (number < high if high_open else number <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        span = (
            f" in {left}{low:g}, {high:g}{right}"
            if high < math.inf
            else (f" {'>' if low_open else '>='} {low:g}")
        )
        raise ConfigError(f"{name} must be a finite number{span}, got {value}")


def _at_least(cfg, names, minimum: int = 1) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value}")


# ---------------------------------------------------------------------------- the sections


MODEL_SIZE_LIMITS = {
    "vocab_size": 10_000_000,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "num_hidden_layers": 10_000,
    "num_attention_heads": 1 << 16,
    "num_key_value_heads": 1 << 16,
}


@dataclass
class ModelArgs:
    """Model"""

    model_name_or_path: str | None = option(
        None, "a Hugging Face model folder (with config.json): the weights to start from"
    )
    attn_implementation: Attention = option(
        "auto", "attention kernel (recipes/core/attention.py); auto: the fastest exact one here"
    )
    rope_scaling: str | None = option(
        None,
        'RoPE scaling as JSON, e.g. \'{"rope_type": "linear", "factor": 4}\' (a 2K model '
        "trained at 8K); saved in the exported config.json; none: the model's own",
    )

    @staticmethod
    def check(cfg) -> None:
        path = cfg.model_name_or_path
        if path is None:
            return  # required to train (recipe.setup says so), not to print or plan a config
        folder = Path(path)
        if not folder.exists():
            raise ConfigError(f"model_name_or_path: {path} does not exist")
        if not (folder / "config.json").is_file():
            why = "is a file" if folder.is_file() else "is a folder without a model"
            raise ConfigError(
                f"model_name_or_path: {path} {why}; give a Hugging Face model folder "
                "(with config.json)"
            )
        config = read_structured(folder / "config.json", json.loads, "JSON")
        # sizes a model could have: beyond them the first allocation fails deep inside torch
        for key, high in MODEL_SIZE_LIMITS.items():
            value = config.get(key)
            if value is not None and not (isinstance(value, int) and 0 < value <= high):
                raise ConfigError(
                    f"model_name_or_path: {folder / 'config.json'}: {key} is "
                    f"{value!r}; it must be a whole number from 1 to {high:,}"
                )
        if cfg.rope_scaling is not None:
            rope_parameters(cfg.rope_scaling, path)


def rope_parameters(text: str, model_path: str | None = None) -> dict:
    """--rope_scaling's JSON, checked: a known rope_type with the keys it needs (transformers
    only warns about them), a factor >= 1. With `model_path`: checked against its config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    try:
        given = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--rope_scaling {text!r} is not JSON ({e.msg})") from None
    if not isinstance(given, dict):
        raise ConfigError(
            f'--rope_scaling {text!r}: give a JSON object, e.g. {{"rope_type": "linear", '
            '"factor": 4}'
        )
    kind = given.get("rope_type", given.get("type"))
    if kind not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(
            f"--rope_scaling: rope_type {kind!r} is not one of {', '.join(ROPE_INIT_FUNCTIONS)}"
        )
    factor = given.get("factor")
    if factor is not None and (
        isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1
    ):
        raise ConfigError(f"--rope_scaling: factor must be a number >= 1, got {factor!r}")
    if model_path is not None:
        scaled_config(model_path, text)
    return given


def scaled_config(model_path: str, rope_scaling: str | None):
    """The model's transformers config, with --rope_scaling's parameters in place of its own
    (its rope_theta kept): what the model is built from, and what its export says."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    if rope_scaling is None:
        return config
    given = json.loads(rope_scaling)
    if not hasattr(config, "rope_parameters"):
        raise ConfigError(f"--rope_scaling: {model_path} is not a RoPE model")
    old = config.rope_parameters or {}
    keep = {k: old[k] for k in ("rope_theta", "partial_rotary_factor") if k in old}
    config.rope_parameters = {**keep, **given}
    try:
        config.standardize_rope_params()
        config.validate_rope()
    except (KeyError, ValueError, TypeError) as e:
        why = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(f"--rope_scaling {rope_scaling}: {' '.join(str(why).split())}") from None
    return config


@dataclass
class DataArgs:
    """Data"""

    data_path: str | None = option(
        None,
        "training data (ShareGPT, Alpaca or messages; JSON or JSONL), several comma-separated: "
        "a.json,b.jsonl",
    )
    template: str | dict = option(
        "vicuna_v1.1",
        "chat template: a name, a YAML/JSON file of template fields, or (in a --config YAML "
        "only) a mapping of template fields",
    )
    model_max_length: int = option(2048, "tokens per training row; longer conversations are cut")
    max_source_length: int | None = option(
        None,
        "tokens per prompt turn (QLoRA recipes cap prompts and replies separately); none: no cap",
    )
    max_target_length: int | None = option(None, "tokens per reply; none: no cap")
    train_on_inputs: bool = option(False, "also train on the prompt tokens, not only the replies")
    group_by_length: bool = option(True, "batch rows of similar length together (less padding)")
    packing: bool = option(False, "several conversations per row, never attending to each other")
    packing_row_tokens: int | None = option(
        None, "cap per packed row (a longer conversation has a row of its own); none: the longest"
    )
    num_proc: int = option(1, "processes that tokenize the data")
    cache_dir: str | None = option(
        None, "where tokenized data sets are cached; none: $CAMELID_CACHE or ~/.cache/camelid"
    )

    @staticmethod
    def check(cfg) -> None:
        _at_least(
            cfg,
            ("model_max_length", "max_source_length", "max_target_length", "packing_row_tokens"),
        )
        _at_least(cfg, ("num_proc",))
        if isinstance(cfg.template, str) and not cfg.template.endswith((".yaml", ".yml", ".json")):
            from fastchat_data.templates import CHAT_TEMPLATE, TEMPLATES

            known = (*TEMPLATES, CHAT_TEMPLATE)
            if cfg.template not in known:
                raise ConfigError(
                    f"template {cfg.template!r} is not one of {', '.join(known)} "
                    "(or a YAML/JSON file of template fields)"
                )
        elif isinstance(cfg.template, str) and not Path(cfg.template).is_file():
            raise ConfigError(f"template: {cfg.template} does not exist")
        for path in data_paths(cfg.data_path):
            if not Path(path).exists():
                raise ConfigError(f"data_path: {path} does not exist")
            if Path(path).is_dir():
                raise ConfigError(f"data_path: {path} is a directory; give a file")


def accumulation_for(cfg, dp_size: int) -> int:
    """The gradient accumulation that makes cfg.global_batch_size on `dp_size` data-parallel
    ranks (cfg.gradient_accumulation_steps when no global batch size is set)."""
    if cfg.global_batch_size <= 0:
        return cfg.gradient_accumulation_steps
    per_step = cfg.per_device_train_batch_size * dp_size
    if cfg.global_batch_size % per_step:
        raise ConfigError(
            f"global_batch_size {cfg.global_batch_size} does not split over {dp_size} "
            f"data-parallel ranks at per_device_train_batch_size "
            f"{cfg.per_device_train_batch_size} (it is not a multiple of {per_step})"
        )
    return cfg.global_batch_size // per_step


def data_paths(data_path: str | None) -> list[str]:
    """The files `--data_path` names: one file (even with a comma in its name), or several
    comma-separated."""
    if not data_path:
        return []
    if Path(data_path).is_file():
        return [data_path]
    return [p for p in data_path.split(",") if p]


@dataclass
class OptimArgs:
    """Optimisation (FastChat's Vicuna defaults)"""

    num_train_epochs: float = option(3.0, "passes over the data (when max_steps is not positive)")
    max_steps: int = option(-1, "optimizer steps to train; -1: num_train_epochs decides")
    per_device_train_batch_size: int = option(2, "rows per process per micro-batch")
    gradient_accumulation_steps: int = option(16, "micro-batches per optimizer step")
    global_batch_size: int = option(
        0,
        "rows per optimizer step over all data-parallel ranks: when positive, it sets "
        "gradient_accumulation_steps to this / (per device x data-parallel ranks) at startup, "
        "so that a job on another number of ranks (an elastic restart) keeps the run's batch",
    )
    learning_rate: float = option(2e-5, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay (on matrices, not norms or biases)")
    warmup_ratio: float = option(
        0.03, "fraction of the steps that warm the learning rate up (rounded up, as Trainer)"
    )
    lr_scheduler_type: Scheduler = option("cosine", "learning-rate schedule (transformers')")
    max_grad_norm: float = option(1.0, "clip gradients to this global norm")
    optim: Optimizer = option(
        "adamw_torch", "adamw_torch, or bitsandbytes' paged / 8-bit AdamW (QLoRA's memory savers)"
    )
    adam_beta1: float = option(0.9, "AdamW beta1, in [0, 1)")
    adam_beta2: float = option(0.999, "AdamW beta2, in [0, 1)")
    adam_epsilon: float = option(1e-8, "AdamW epsilon, > 0")
    seed: int = option(42, "random seed (data order, dropout, new weights), 0 to 2^32 - 1")
    max_bad_steps: int = option(
        0, "non-finite loss/grad steps to skip (not apply) before stopping the run"
    )

    @staticmethod
    def check(cfg) -> None:
        _at_least(cfg, ("per_device_train_batch_size", "gradient_accumulation_steps"))
        _at_least(cfg, ("max_bad_steps", "global_batch_size"), 0)
        if cfg.global_batch_size % cfg.per_device_train_batch_size:
            raise ConfigError(
                f"global_batch_size {cfg.global_batch_size} is not a multiple of "
                f"per_device_train_batch_size {cfg.per_device_train_batch_size}"
            )
        if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
            raise ConfigError("set max_steps or num_train_epochs to a positive value")
        _bounded(cfg, "num_train_epochs", -math.inf, high=1e6)
        # above 1, every AdamW step moves each weight by about the learning rate: the
        # weights are noise after one step (a typo, such as 2e5 for 2e-5)
        _bounded(cfg, "learning_rate", 0, high=1)
        _bounded(cfg, "weight_decay", 0, high=1)
        _bounded(cfg, "warmup_ratio", 0, high=1)
        _bounded(cfg, "max_grad_norm", 0, high=math.inf, low_open=True)
        _bounded(cfg, "adam_beta1", 0, high=1, high_open=True)
        _bounded(cfg, "adam_beta2", 0, high=1, high_open=True)
        # epsilon 0 divides by zero on the first step that leaves a moment at 0 (NaN weights)
        _bounded(cfg, "adam_epsilon", 0, high=1, low_open=True)
        if not 0 <= cfg.seed < 2**32:
            raise ConfigError(f"seed must be a whole number from 0 to 2^32 - 1, got {cfg.seed}")


@dataclass
class ParallelArgs:
    """Parallelism, precision and speed"""

    strategy: str = option(
        "auto",
        "how processes share the model: auto (single for 1 process, else ddp), or one of "
        + ", ".join(parallel.names()),
    )
    deepspeed: str | None = option(
        None,
        "a DeepSpeed JSON; its ZeRO stage sets strategy when strategy is not given; "
        "default: ds_configs/<strategy>.json",
    )
    sharded_load: bool = option(True, "FSDP2 / ZeRO-3: no rank ever holds the whole model")
    bf16: bool = option(False, "bf16 mixed precision (fp16 is not supported)")
    tf32: bool = option(False, "TF32 matmuls on GPUs that have them")
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass: less memory, more compute"
    )
    loss_chunk_size: int = option(
        512,
        "chunked loss: logits only where labels are set, this many rows at a time; "
        "0: transformers' loss",
    )
    compile: bool = option(False, "torch.compile each decoder layer")
    sequence_parallel_size: int = option(
        1,
        "Ulysses sequence parallelism: ranks sharing each row, split into that many contiguous "
        "shards (it divides the processes and the model's attention and key/value heads)",
    )
    use_liger_kernel: bool = option(False, "Liger's fused kernels (needs liger-kernel and a GPU)")

    @staticmethod
    def check(cfg) -> None:
        if cfg.strategy != "auto":
            try:
                strategy = parallel.get(cfg.strategy)
            except parallel.UnknownStrategy as e:
                raise ConfigError(f"{e} (or auto)") from None
            if cfg.optim != "adamw_torch" and strategy.engine == "deepspeed":
                raise ConfigError(
                    f"optim {cfg.optim} is a bitsandbytes optimizer; {strategy.name} (DeepSpeed) "
                    "needs adamw_torch"
                )
            if cfg.compile and not strategy.compiles:
                raise ConfigError(
                    f"--compile True with strategy {strategy.name}: ZeRO-3 gathers each "
                    "parameter in module hooks that a per-layer torch.compile would trace "
                    "through, and DeepSpeed's own engine.compile() is not supported here; use "
                    "--strategy fsdp (FSDP2, compiled per layer), zero2, ddp, or --compile False"
                )
        _at_least(cfg, ("sequence_parallel_size",))  # the rest: sequence_parallel.check
        if cfg.deepspeed:  # read now: a malformed file stops the run before anything starts
            read_structured(Path(cfg.deepspeed), json.loads, "JSON")
        if cfg.loss_chunk_size < 0:
            raise ConfigError(
                f"loss_chunk_size must be 0 (transformers' loss) or positive, "
                f"got {cfg.loss_chunk_size}"
            )


@dataclass
class AdapterArgs:
    """Model form: the full model, or an adapter on a (quantized) base"""

    peft_method: Literal["none", "lora", "prompt_tuning", "p_tuning"] = option(
        "none", "none: train every weight; lora, prompt_tuning, p_tuning: a PEFT adapter"
    )
    quantization: Literal["none", "nf4", "fp4", "int8"] = option(
        "none", "the base's weights under an adapter: nf4 or fp4 (4-bit, QLoRA), int8, none"
    )
    double_quant: bool = option(True, "4-bit: quantize the quantization constants too")
    lora_r: int = option(64, "LoRA rank")
    lora_alpha: float = option(16, "LoRA scale numerator (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input, in [0, 1)")
    lora_target_modules: str = option(
        "all-linear", "layers that get LoRA: all-linear, or comma-separated names: q_proj,v_proj"
    )
    num_virtual_tokens: int = option(20, "prompt tuning / P-tuning: virtual tokens prepended")

    @staticmethod
    def check(cfg) -> None:
        _at_least(cfg, ("lora_r", "num_virtual_tokens"))
        _bounded(cfg, "lora_alpha", 0, high=math.inf, low_open=True)
        _bounded(cfg, "lora_dropout", 0, high=1, high_open=True)
        if cfg.peft_method == "none" and cfg.quantization != "none":
            raise ConfigError(
                f"quantization {cfg.quantization} quantizes the base under an adapter: add "
                "--peft_method lora (QLoRA), or --quantization none for a full fine-tune"
            )
        if cfg.peft_method == "none":
            return
        if cfg.rope_scaling is not None:
            raise ConfigError(
                "--rope_scaling is saved in the exported model's config.json; an adapter's "
                "export has none (train the full model: --peft_method none)"
            )
        if cfg.compile:
            raise ConfigError(
                "--compile True compiles the full model's decoder layers; an adapter's "
                "quantized (bitsandbytes) and PEFT layers are not compiled: --compile False"
            )
        if cfg.peft_method != "lora" and cfg.packing:
            raise ConfigError(
                f"{cfg.peft_method} prepends virtual tokens to each row: it cannot pack rows"
            )
        if cfg.strategy == "auto":
            return
        strategy = parallel.get(cfg.strategy)
        able = [s.name for s in parallel.STRATEGIES.values() if s.adapters]
        if not strategy.adapters:
            raise ConfigError(
                f"adapters train with strategy {', '.join(able)}; "
                f"{strategy.name} shards the model for a full fine-tune"
            )
        if cfg.quantization != "none" and not strategy.quantized_base:
            able = [s.name for s in parallel.STRATEGIES.values() if s.quantized_base]
            raise ConfigError(
                f"a {cfg.quantization} base trains with strategy {', '.join(able)}; "
                f"{strategy.name} needs --quantization none"
            )
        if cfg.peft_method != "lora" and not strategy.prompt_learning:
            able = [s.name for s in parallel.STRATEGIES.values() if s.prompt_learning]
            raise ConfigError(
                f"{cfg.peft_method} trains with strategy {', '.join(able)}; "
                f"{strategy.name} is for LoRA"
            )


@dataclass
class CheckpointArgs:
    """Run folder and checkpoints"""

    output_dir: str = option("runs/vicuna", "the run's folder: checkpoints, metrics, the export")
    overwrite_output_dir: bool = option(
        False,
        "start afresh when output_dir holds checkpoints of another run: they are moved aside "
        "to OUT/replaced/<time>/ (never deleted)",
    )
    resume_with_changed_data: bool = option(
        False,
        "resume although the training data's content changed since the checkpoint (the data "
        "order is rebuilt from the new data at the same step)",
    )
    allow_global_batch_change: bool = option(
        False,
        "resume although the global batch size (per device x accumulation x data-parallel "
        "ranks) differs from the checkpoint's: the step count and the learning-rate schedule "
        "continue, step s trains global batch s of the new batch size's data order",
    )
    save_steps: int = option(500, "checkpoint every this many optimizer steps")
    save_total_limit: int = option(2, "complete checkpoints to keep, the newest; 0: all")

    @staticmethod
    def check(cfg) -> None:
        _at_least(cfg, ("save_steps",))
        _at_least(cfg, ("save_total_limit",), 0)


@dataclass
class LogArgs:
    """Logging"""

    logging_steps: int = option(1, "log metrics every this many optimizer steps")
    report_to: str = option(
        "tensorboard",
        f"trackers: any of {','.join(TRACKERS)} (comma-separated), or none",
    )
    peak_tflops: float | None = option(
        None, "per-device peak TFLOP/s for the MFU estimate; none: guessed from the GPU"
    )
    verbose: bool = verbose_option()

    @staticmethod
    def check(cfg) -> None:
        _at_least(cfg, ("logging_steps",))
        if cfg.peak_tflops is not None:
            _bounded(cfg, "peak_tflops", 0, high=1e7, low_open=True)
        trackers = [t.strip() for t in str(cfg.report_to).split(",") if t.strip()]
        if (
            not trackers
            or set(trackers) - {*TRACKERS, "none"}
            or ("none" in trackers and len(trackers) > 1)
        ):
            raise ConfigError(
                f"report_to {cfg.report_to!r}: give none or any of "
                f"{', '.join(TRACKERS)} (comma-separated)"
            )


SECTIONS = (ModelArgs, DataArgs, OptimArgs, ParallelArgs, AdapterArgs, CheckpointArgs, LogArgs)

# Fields a relaunch may change without making it another run (output_dir: a run folder that
# was moved, or spelled differently, is the same run).
RESUMABLE_CHANGES = {
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "report_to",
    "overwrite_output_dir",
    "resume_with_changed_data",
    "allow_global_batch_change",
    "output_dir",
    "num_proc",
    "cache_dir",
    "peak_tflops",
    "verbose",
    "max_steps",
    "num_train_epochs",
}


# ---------------------------------------------------------------------------- composition


def compose(name: str, sections, defaults: dict | None = None, *, doc: str = "", checks=()) -> type:
    """A flat dataclass of every option of `sections`, with `defaults` replacing theirs.
    Its `check()` runs each section's check, then `checks` (functions of the config)."""
    defaults = dict(defaults or {})
    specs, seen = [], {}
    for section in sections:
        hints = type_hints(section)
        for f in fields(section):
            if f.name in seen:
                raise TypeError(f"{name}: {f.name} is in {seen[f.name]} and {section.__name__}")
            seen[f.name] = section.__name__
            # a default as the command line would give it (16 for a float option is 16.0), so
            # that a printed config reruns as the same run
            default = f.default
            if default is not MISSING and not isinstance(default, dict):
                default = convert(f.name, hints[f.name], default)
            new = dataclasses.field(
                default=default,
                default_factory=f.default_factory,
                metadata={**f.metadata, "section": section},
            )
            if f.name in defaults:  # a value, or a function giving it (bf16 where supported)
                value = defaults.pop(f.name)
                if callable(value):
                    new.default, new.default_factory = MISSING, value
                else:
                    new.default = convert(f.name, hints[f.name], value)
                    new.default_factory = MISSING
            specs.append((f.name, hints[f.name], new))
    if defaults:
        raise TypeError(f"{name}: defaults for unknown options {', '.join(defaults)}")

    def check(self):
        for section in sections:
            section.check(self)
        for extra in checks:
            extra(self)
        return self

    def run_fingerprint(self) -> str:
        """What makes two runs the same run (for resuming into an output directory)."""
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUMABLE_CHANGES}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    cls = dataclasses.make_dataclass(
        name,
        specs,
        namespace={"check": check, "run_fingerprint": run_fingerprint, "__doc__": doc},
    )
    cls.sections = tuple(sections)
    cls.__module__ = __name__
    return cls


# ---------------------------------------------------------------------------- FastChat's flags

# FastChat / HF flags with another name or no meaning here: flag -> why.
FASTCHAT_FLAGS = {
    "fsdp": "FastChat's --fsdp options map to a strategy (fsdp_strategy())",
    "fsdp_transformer_layer_cls_to_wrap": "FSDP wraps the model's own decoder layer class",
    "lazy_preprocess": "the training set is always built once and cached",
    "no_cuda": "renamed use_cpu in transformers 5",
    "use_cpu": "no GPU -> CPU processes on gloo, automatically",
    "evaluation_strategy": "evaluation is `python -m recipes.eval` (not part of training)",
    "eval_strategy": "see evaluation_strategy",
    "save_strategy": "checkpoints every save_steps",
    "fp16": "fp16 is not supported; use --bf16 True",
}


def fsdp_strategy(options: str) -> str:
    """FastChat's / HF Trainer's `--fsdp "full_shard auto_wrap offload"` as a camelid strategy.
    Every word either maps or is an error: a dropped option would change memory silently."""
    words = set(options.replace(",", " ").split())
    known = {"auto_wrap"} | {w for s in parallel.STRATEGIES.values() for w in s.fastchat_fsdp}
    unknown = words - known
    if unknown or not words:
        raise ConfigError(
            f"--fsdp {options!r}: unsupported option(s) {', '.join(sorted(unknown)) or '(none)'}; "
            "use full_shard or shard_grad_op, with offload and auto_wrap (hybrid sharding is "
            "not supported)"
        )
    found = parallel.from_fastchat_fsdp(words)
    if found is None:
        raise ConfigError(
            f"--fsdp {options!r}: no strategy combines {', '.join(sorted(words))}; say "
            "full_shard or shard_grad_op (offload goes with full_shard only)"
        )
    return found.name


def strategy_of_deepspeed_config(path: str) -> str:
    cfg = read_structured(Path(path), json.loads, "JSON")
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    offload = isinstance(zero, dict) and (zero.get("offload_param") or {}).get("device") == "cpu"
    found = parallel.from_zero_config(stage, offload) if isinstance(stage, int) else None
    if found is None:
        raise ConfigError(f"{path}: ZeRO stage {stage} is not supported (use 2 or 3)")
    return found.name


# FastChat flags that set a camelid setting: flag -> (setting, value from the flag's text)
FASTCHAT_MAPPED = {"fsdp": ("strategy", fsdp_strategy)}


# ---------------------------------------------------------------------------- the command line


class _FastChatFlag(argparse.Action):
    """A FASTCHAT_FLAGS flag: mapped (--fsdp sets strategy, where it stands on the line, as
    --strategy would) or noted; --fp16 True is refused."""

    # argparse calls an Action with (parser, namespace, values, option_string) positional
    def __call__(self, parser, namespace, value, option_string=None):  # noqa: PLR0917
        key = self.dest
        if key in FASTCHAT_MAPPED:
            setting, mapped = FASTCHAT_MAPPED[key]
            setattr(namespace, setting, mapped(value))
            parser.notes.append(f"--{key} {value!r}: {setting} {getattr(namespace, setting)}")
            return
        if key == "fp16" and convert("fp16", bool, value):
            raise ConfigError(f"--fp16: {FASTCHAT_FLAGS[key]}")
        parser.notes.append(f"--{key}: {FASTCHAT_FLAGS[key]}")


def config_parser(cls) -> argparse.ArgumentParser:
    """The command line of a composed config class: its sections' options, --config,
    --print_config, and FastChat's flags."""
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    description = (
        f"{doc}\n\nEvery option is also a key of a --config YAML recipe; the command line "
        "overrides it.\nBooleans: --flag, --flag True|False. none (or null) unsets an option "
        "whose default is none."
    )
    usage = "%(prog)s [-h] [--config FILE] [--print_config] [--OPTION VALUE ...]"
    parser = build_parser(cls, description=description, usage=usage)
    parser.notes = []
    yamls = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"a YAML recipe of these options: a path, or a name in recipes/configs ({yamls})",
    )
    parser.add_argument(
        "--print_config",
        metavar="BOOL",
        nargs="?",
        const=True,
        default=False,
        type=lambda text: convert("print_config", bool, text),
        help="print the resolved settings (--config, then the command line) as YAML to rerun "
        "with --config FILE, and exit without training",
    )
    parser.add_argument("--local_rank", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    group = parser.add_argument_group(
        "FastChat / Hugging Face Trainer flags",
        "accepted so that FastChat's commands carry over: mapped, or noted and ignored",
    )
    for key, why in FASTCHAT_FLAGS.items():
        group.add_argument(
            f"--{key}",
            action=_FastChatFlag,
            nargs="?",
            const="True",
            metavar="VALUE",
            default=argparse.SUPPRESS,
            help=why,
        )
    return parser


def config_yaml(cfg, notes: list[str] = ()) -> str:
    """Every setting of `cfg` as a YAML recipe: `--config FILE` reruns the same run
    (the same run_fingerprint())."""
    head = [
        f"# {type(cfg).__name__}, resolved; rerun with --config FILE",
        *(f"# {n}" for n in notes),
    ]
    body = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)
    return "\n".join(head) + "\n" + body


def recipe_values(path_text: str, cls) -> dict:
    """A YAML recipe's values, each converted and checked as the command line's would be."""
    path = Path(path_text)
    if not path.exists() and (CONFIG_DIR / path).exists():
        path = CONFIG_DIR / path
    if not path.exists():
        raise ConfigError(f"config file {path_text} does not exist")
    hints = type_hints(cls)
    loaded = {}
    for key, value in read_structured(path, yaml.safe_load, "YAML").items():
        if key not in hints:
            raise ConfigError(str(unknown_option(key, hints, str(path), noun="key")))
        if key == "template" and isinstance(value, dict):
            loaded[key] = value
            continue
        try:
            loaded[key] = convert(key, hints[key], value)
        except UsageError as e:
            raise ConfigError(f"{path}: {e}") from None
    return loaded


def load_config(argv: list[str] | None, cls):
    """`--config FILE` (a YAML recipe) then `--key value` / `--key=value` overrides, into the
    composed config class `cls`. `--help` and `--print_config` print and raise SystemExit(0);
    a bad command line or recipe raises one ConfigError.

    Returns the config and notes about FastChat flags that were mapped or ignored."""
    argv = normalize(list(sys.argv[1:] if argv is None else argv))
    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.partition("=")[2]
    loaded = recipe_values(config_path, cls) if config_path else {}
    parser = config_parser(cls)
    # the recipe's values as the defaults (shown by --help, overridden by the command line)
    defaults = cls()
    parser.set_defaults(
        **{f.name: loaded.get(f.name, getattr(defaults, f.name)) for f in fields(cls)}
    )
    try:
        cfg, rest, extra = parser.parse_args_into_dataclasses(
            argv, return_remaining_strings=True, look_for_args_file=False
        )
    except UsageError as e:
        raise ConfigError(str(e)) from None
    if extra:
        if extra[0].startswith("--"):
            error = unknown_option(extra[0][2:].partition("=")[0], type_hints(cls))
            raise ConfigError(str(error))
        raise ConfigError(
            f"command line: unexpected argument {extra[0]!r}: options are --key value"
        )
    given = set(loaded) | {arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")}
    if cfg.deepspeed and not {"strategy", "fsdp"} & given:
        cfg.strategy = strategy_of_deepspeed_config(cfg.deepspeed)
    cfg.check()
    if getattr(rest, "print_config", False):
        print(config_yaml(cfg, parser.notes), end="", flush=True)
        raise SystemExit(0)
    return cfg, parser.notes


def read_structured(path: Path, parse, kind: str) -> dict:
    """A YAML or JSON file that must hold a mapping; anything else is one clear ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    try:
        loaded = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else "nested too deeply"
        raise ConfigError(f"{path}: malformed {kind}: {first}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, found {type(loaded).__name__}")
    return loaded
