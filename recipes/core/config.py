"""Training arguments: one dataclass, YAML recipes, command-line overrides.

Flag names follow FastChat and Hugging Face (`--model_name_or_path`, `--data_path`,
`--per_device_train_batch_size`, ...), so FastChat's commands carry over; the few FastChat flags
whose meaning changed are mapped in FASTCHAT_FLAGS, in this one place.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import re
import sys
import typing
from dataclasses import MISSING, dataclass, field, fields
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


def option(default=MISSING, help: str = "", *, default_factory=MISSING, **metadata):
    """A config field and its one-line `--help` text (HfArgumentParser reads metadata["help"]).
    A subclass that only changes a default may redeclare the field plainly: --help then shows
    the help of the nearest base class that gives one."""
    return field(default=default, default_factory=default_factory,
                 metadata={"help": help, **metadata})  # fmt: skip


@dataclass
class TrainConfig:
    """The full fine-tune's settings (FastChat's Vicuna recipe and flag names)."""

    # model and data; with neither given, the tiny model trains on the embedded identity data
    model_name_or_path: str | None = option(
        None, "a Hugging Face model folder (with config.json); none: the tiny demo model"
    )
    data_path: str | None = option(
        None,
        "training conversations (ShareGPT, Alpaca or messages; JSON or JSONL), several "
        "comma-separated: a.json,b.jsonl; none: the embedded identity data",
    )
    template: str | dict = option(
        "vicuna_v1.1",
        "chat template: a name, a YAML/JSON file of template fields, or (in a "
        "--config YAML only) a mapping of template fields",
    )
    model_max_length: int = option(2048, "tokens per training row; longer conversations are cut")
    max_source_length: int | None = option(
        None,
        "tokens per prompt turn (QLoRA recipes cap prompts and replies separately); none: no cap",
    )
    max_target_length: int | None = option(None, "tokens per reply; none: no cap")
    output_dir: str = option(
        "runs/vicuna", "the run's folder: checkpoints, metrics, exported model"
    )
    overwrite_output_dir: bool = option(
        False, "start afresh even if output_dir holds checkpoints of another run"
    )
    # optimisation (FastChat's Vicuna defaults)
    num_train_epochs: float = option(3.0, "passes over the data (when max_steps is not positive)")
    max_steps: int = option(-1, "optimizer steps to train; -1: num_train_epochs decides")
    per_device_train_batch_size: int = option(2, "rows per process per micro-batch")
    gradient_accumulation_steps: int = option(16, "micro-batches per optimizer step")
    learning_rate: float = option(2e-5, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.03, "fraction of the steps that warm the learning rate up")
    lr_scheduler_type: str = option(
        "cosine", "learning-rate schedule: any of transformers' SchedulerType (cosine, linear, ...)"
    )
    max_grad_norm: float = option(1.0, "clip gradients to this global norm")
    optim: str = option(
        "adamw_torch",
        "adamw_torch, or paged_adamw_32bit, paged_adamw_8bit, adamw_8bit (bitsandbytes)",
    )
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    seed: int = option(42, "random seed (data order, dropout, new weights)")
    # precision and memory
    bf16: bool = option(False, "bf16 mixed precision (fp16 is not supported)")
    tf32: bool = option(False, "TF32 matmuls on GPUs that have them")
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass: less memory, more compute"
    )
    strategy: str = option("ddp", f"how processes share the model: {', '.join(STRATEGIES)}")
    deepspeed: str | None = option(
        None,
        "a DeepSpeed JSON; its ZeRO stage sets strategy when strategy is not given; "
        "default: ds_configs/<strategy>.json",
    )
    sharded_load: bool = option(True, "FSDP2 / ZeRO-3: no rank ever holds the whole model")
    # batches
    group_by_length: bool = option(True, "batch rows of similar length together (less padding)")
    packing: bool = option(False, "several conversations per row, never attending to each other")
    packing_row_tokens: int | None = option(
        None, "cap per packed row; none: the longest conversation"
    )
    train_on_inputs: bool = option(False, "also train on the prompt tokens, not only the replies")
    num_proc: int = option(1, "processes that tokenize the data")
    # speed (attention implementation, loss, compilation)
    loss_chunk_size: int = option(
        512,
        "chunked loss: logits only where labels are set, this many rows at a time; "
        "0: transformers' loss",
    )
    attn_implementation: str = option(
        "auto", "attention kernel: auto, sdpa, sdpa_packed, flex_attention, ... (attention.py)"
    )
    compile: bool = option(False, "torch.compile each decoder layer")
    use_liger_kernel: bool = option(False, "Liger's fused kernels (needs liger-kernel and a GPU)")
    # robustness
    max_bad_steps: int = option(
        0, "non-finite loss/grad steps to skip (not apply) before stopping the run"
    )
    # checkpoints and logs
    save_steps: int = option(500, "checkpoint every this many optimizer steps")
    save_total_limit: int = option(2, "complete checkpoints to keep, the newest; 0: all")
    logging_steps: int = option(1, "log metrics every this many optimizer steps")
    report_to: str = option(
        "tensorboard",
        "trackers: any of tensorboard,wandb,mlflow,trackio (comma-separated), or none",
    )
    peak_tflops: float | None = option(
        None, "per-device peak TFLOP/s for the MFU estimate; none: guessed from the GPU"
    )
    cache_dir: str | None = option(
        None, "where tokenized data sets are cached; none: $CAMELID_CACHE or ~/.cache/camelid"
    )

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
        if (
            not trackers
            or set(trackers) - set(TRACKERS)
            or ("none" in trackers and len(trackers) > 1)
        ):
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
RESUMABLE_CHANGES = {"save_steps", "save_total_limit", "logging_steps", "report_to", "overwrite_output_dir", "output_dir",
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


# -- the command line ----------------------------------------------------------------------------
# transformers' HfArgumentParser (FastChat's parser) makes one argparse option per dataclass
# field: its type, its default and its metadata["help"]; `--help` lists them all. What stays
# here is what argparse has no word for: the YAML recipe under the command line (its values
# become the parser's defaults, so `--config X --help` shows them), values converted and checked
# by _coerce (one set of rules and messages for YAML and the command line), FastChat's flags,
# the strategy read from a --deepspeed file, and errors as one ConfigError instead of usage + exit.


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` of every camelid command: the description as written, then each option with its
    default (argparse's ArgumentDefaultsHelpFormatter, less defaults its help already states)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.required or action.default is argparse.SUPPRESS
                or not action.option_strings or (action.default is None and "none:" in text)):  # fmt: skip
            return text
        return f"{text} (default: %(default)s)"

    def _get_default_metavar_for_optional(self, action):
        return {int: "INT", float: "FLOAT"}.get(
            action.type, super()._get_default_metavar_for_optional(action)
        )


class _OneLineErrors:
    """argparse prints usage and exits 2 on a bad command line; a recipe raises one ConfigError
    instead (loop.main prints it once, from rank 0, and exits 2 without a traceback)."""

    def error(self, message: str):
        m = re.match(r"argument (--\w+): (.*)", message, re.S)
        if m:  # _coerce's own messages name the key already
            message = m[2] if m[2].startswith(m[1][2:] + " ") else f"{m[1]}: {m[2]}"
        raise ConfigError(f"command line: {' '.join(message.split())}")


class _StrictParser(_OneLineErrors, argparse.ArgumentParser):
    pass


class _FastChatFlag(argparse.Action):
    """A FASTCHAT_FLAGS flag: mapped (--fsdp sets strategy, where it stands on the line, as
    --strategy would) or noted; --fp16 True is refused."""

    def __call__(self, parser, namespace, value, option_string=None):
        key = self.dest
        why = FASTCHAT_FLAGS[key][1]
        if key == "fsdp":
            namespace.strategy = fsdp_strategy(value)
            parser.notes.append(f"--fsdp {value!r}: strategy {namespace.strategy}")
            return
        if key == "fp16" and _parse_value(value, False, key):
            raise ConfigError(f"--fp16: {why}")
        parser.notes.append(f"--{key}: {why}")


def _field_help(cls: type, name: str) -> str:
    """The field's help, or (a subclass that only changed the default) its nearest base's."""
    for klass in cls.__mro__:
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None and declared.metadata.get("help"):
            return declared.metadata["help"]
    return ""


def _metavar(hint) -> str:
    kinds = set(typing.get_args(hint) or (hint,)) - {type(None)}
    for kind, metavar in ((bool, "BOOL"), (int, "INT"), (float, "FLOAT")):
        if kinds == {kind}:
            return metavar
    return "TEXT"


class _ConfigParser(_OneLineErrors):
    """HfArgumentParser for one config class, with camelid's rules: no prefix matching (a prefix
    must never silently set another option), values converted by _coerce, FASTCHAT_FLAGS, and
    --config, --print_config, --local_rank. config_parser(cls) makes one."""

    def __init__(self, cls: type = TrainConfig, **kwargs):
        self.cls, self.notes = cls, []
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        description = (f"{doc}\n\nEvery option is also a key of a --config YAML recipe; the command line "
                       "overrides it.\nBooleans: --flag, --flag True|False (--no_flag where the "
                       "default is True).\nnone (or null) unsets an option whose default is none.")  # fmt: skip
        usage = "%(prog)s [-h] [--config FILE] [--print_config] [--OPTION VALUE ...]"
        super().__init__(cls, allow_abbrev=False, formatter_class=HelpFormatter, usage=usage,
                         description=description, **kwargs)  # fmt: skip
        names = {f.name for f in fields(cls)}
        for action in self._actions:
            if action.dest not in names:
                continue
            if action.option_strings[0].startswith("--no_"):  # HfArgumentParser's complement
                action.help = argparse.SUPPRESS
            else:
                action.type = _cli_value(action.dest, cls)
            # one spelling in --help: --key_name (load_config reads --key-name as --key_name)
            for alias in [o for o in action.option_strings if "-" in o[2:]]:
                action.option_strings.remove(alias)
                del self._option_string_actions[alias]
        self.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                          help="a YAML recipe of these options: a path, or a name in recipes/configs ("
                          + ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))) + ")")  # fmt: skip
        self.add_argument("--print_config", metavar="BOOL", nargs="?", const=True, default=False,
                          type=_cli_bool("print_config"),
                          help="print the resolved settings (--config, then the command line) as "
                          "YAML to rerun with --config FILE, and exit without training")  # fmt: skip
        self.add_argument("--local_rank", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        group = self.add_argument_group(
            "FastChat / Hugging Face Trainer flags",
            "accepted so that FastChat's commands carry over: mapped, or noted and ignored",
        )
        for key, (_, why) in FASTCHAT_FLAGS.items():
            group.add_argument(f"--{key}", action=_FastChatFlag, nargs="?", const="True",
                               metavar="VALUE", default=argparse.SUPPRESS, help=why)  # fmt: skip

    def _add_dataclass_arguments(self, dtype):
        # HfArgumentParser narrows field.type in place (`int | None` -> int) on the class's own
        # Field objects, which subclasses share; it gets copies, the classes keep their types.
        hints = typing.get_type_hints(dtype)
        for declared in fields(dtype):
            f = copy.copy(declared)
            f.type = hints[f.name]
            if f.name == "template":
                # `str | dict`: HfArgumentParser takes the non-str member of a union with str
                # (dict), which cannot read text; on the command line a template is a name or a
                # file (str), a mapping comes from the YAML recipe only.
                f.type = str
            f.metadata = {"help": _field_help(dtype, f.name).replace("%", "%%")}
            self._parse_dataclass_field(self, f)
            self._option_string_actions[f"--{f.name}"].metavar = _metavar(f.type)


@functools.cache
def _parser_class() -> type:
    # here, not at the top: importing transformers takes seconds (launch/ and plan import us)
    from transformers.hf_argparser import HfArgumentParser

    return type("ConfigParser", (_ConfigParser, HfArgumentParser), {})


def config_parser(cls: type = TrainConfig) -> argparse.ArgumentParser:
    """The command line of `cls` (TrainConfig or a recipe's subclass of it)."""
    return _parser_class()(cls)


def _cli_value(name: str, cls: type):
    """The command line's text for `name`, converted and checked as a YAML value is."""

    def convert(text: str):
        try:
            return _coerce(name, text, cls)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def _cli_bool(name: str):
    def convert(text: str) -> bool:
        try:
            return _parse_value(text, False, name)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _normalize(argv: list[str]) -> list[str]:
    """--key-name as --key_name (as before: torch's launcher passes --local-rank), and a value
    that starts with "-" joined to its key (--learning_rate -1e-5: argparse would take -1e-5
    for an option)."""
    out: list[str] = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            arg = f"--{key.replace('-', '_')}{eq}{value}"
        elif (arg.startswith("-") and arg != "-h" and out and out[-1].startswith("--")
              and len(out[-1]) > 2 and "=" not in out[-1]):  # fmt: skip
            out[-1] += f"={arg}"
            continue
        out.append(arg)
    return out


def config_yaml(cfg, notes: list[str] = ()) -> str:
    """Every setting of `cfg` as a YAML recipe: `--config FILE` reruns the same run
    (the same run_fingerprint())."""
    head = [
        f"# {type(cfg).__name__}, resolved; rerun with --config FILE",
        *(f"# {n}" for n in notes),
    ]
    body = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)
    return "\n".join(head) + "\n" + body


def load_config(argv: list[str] | None = None, cls: type = TrainConfig):
    """`--config FILE` (a YAML recipe) then `--key value` / `--key=value` overrides, into `cls`
    (TrainConfig or a recipe's subclass of it). `--help` and `--print_config` print and raise
    SystemExit(0); a bad command line or recipe raises one ConfigError.

    Returns the config and notes about FastChat flags that were mapped or ignored.
    """
    argv = _normalize(list(sys.argv[1:] if argv is None else argv))
    pre = _StrictParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    defaults, loaded = cls(), {}
    if config_path:
        path = Path(config_path)
        if not path.exists() and (CONFIG_DIR / path).exists():
            path = CONFIG_DIR / path
        if not path.exists():
            raise ConfigError(f"config file {config_path} does not exist")
        for k, v in read_structured(path, yaml.safe_load, "YAML").items():
            if k not in _types(cls):
                raise _unknown(k, str(path), cls)
            loaded[k] = _coerce(k, v, cls)
    parser = config_parser(cls)
    # the recipe's values as the defaults (default_factory ones included: HfArgumentParser
    # would show and set a bool's default_factory as False)
    parser.set_defaults(
        **{f.name: loaded.get(f.name, getattr(defaults, f.name)) for f in fields(cls)}
    )
    # -> the config, a namespace of the other options (--print_config, ...), unknown strings
    cfg, *rest, extra = parser.parse_args_into_dataclasses(
        argv, return_remaining_strings=True, look_for_args_file=False
    )
    if extra:
        if extra[0].startswith("--"):
            raise _unknown(extra[0][2:].partition("=")[0], "command line", cls)
        raise ConfigError(f"unexpected argument {extra[0]!r}: options are --key value")
    given = set(loaded) | {arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")}
    if cfg.deepspeed and not {"strategy", "fsdp"} & given:
        cfg.strategy = strategy_of_deepspeed_config(cfg.deepspeed)
    cfg.check()
    if rest and getattr(rest[0], "print_config", False):
        print(config_yaml(cfg, parser.notes), end="", flush=True)
        raise SystemExit(0)
    return cfg, parser.notes


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
