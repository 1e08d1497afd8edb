"""A quiet default: third-party messages that do not concern the user, filtered where they come
from (a logger, a warning category and message), each with the reason. `--verbose` on any
camelid command shows them all again.

What stays: camelid's own lines (one per event, from rank 0 unless a rank has something of its
own to say), progress bars on a terminal, and every warning not listed here.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from fastchat_data.options import option

# (warning category, message pattern, why it is filtered)
WARNINGS = (
    (
        UserWarning,
        r"torch\.distributed is disabled, unavailable or uninitialized",
        "torch DCP, on every single-process save and load: a single process is what it is",
    ),
    (
        FutureWarning,
        r"`torch\.distributed\.\w+` is deprecated",
        "DeepSpeed's ZeRO calls torch's old collective names: hundreds of lines a run, its code",
    ),
    (
        FutureWarning,
        r"`gradient_checkpointing_enable` is deprecated",
        "peft's prepare_model_for_kbit_training calls transformers' old name (camelid uses the "
        "new one)",
    ),
    (
        FutureWarning,
        r".*`torch\.cpu\.amp\.autocast",
        "DeepSpeed's CPU accelerator uses torch's old autocast name",
    ),
)
# loggers whose messages are noise for a camelid user, at the level they are cut below
LOGGERS = {
    # on CPUs with AVX512-BF16, bitsandbytes tries to fetch an optional 4-bit inference kernel
    # from the Hub at import and warns when it cannot (offline); its built-in kernel runs anyway
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    # torchrun's agent logs every worker start and stop; camelid reports failures itself
    "torch.distributed.elastic": logging.ERROR,
}


def quiet(verbose: bool = False) -> None:
    """Apply the filters (before the libraries are imported where it matters)."""
    if verbose:
        return
    for category, pattern, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, level in LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # DeepSpeed warns "Setting accelerator to CPU. If you have GPU..." in every process that
    # imports it without a GPU; naming the accelerator it would pick anyway silences it
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"
    if not sys.stderr.isatty():  # logs keep one summary line per phase, not bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def verbose_requested(argv: list[str] | None) -> bool:
    """`--verbose` (or `--verbose True`) anywhere on a command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--verbose":
            nxt = args[i + 1] if i + 1 < len(args) else "true"
            return nxt.lower() not in ("false", "0", "no")
        if arg.startswith("--verbose="):
            return arg.partition("=")[2].lower() not in ("false", "0", "no")
    return False


def verbose_option():
    """A command's --verbose option (a dataclass field), worded once for every command that
    has one; `verbose_requested` reads it off the command line before the options are parsed."""
    return option(False, "also show the third-party warnings camelid filters out")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
