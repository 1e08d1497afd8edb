"""Offline: a camelid checkpoint -> a plain Hugging Face folder that loads with no camelid import.

    python -m recipes.convert_checkpoint OUT/checkpoints/step-00001000 converted/ \\
        [--max_shard_size 2GB]

Works without the GPUs or the process count of the run. A full-model checkpoint becomes a model
folder, an adapter checkpoint (LoRA / QLoRA on one process or DDP) a peft adapter folder; both
carry the tokenizer with the training template as its chat template and, for a model, a
generation config that stops where a reply ends, as the recipe's own export does. Memory stays
bounded by one output shard (plus the tensor being read): DCP checkpoints are read one tensor
at a time from their metadata; ZeRO checkpoints go through DeepSpeed's own converter. The
checkpoint is verified first (sizes, checksums, and every pickle through the restricted
loaders), and the output is never the checkpoint, its run folder or the base model.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fastchat_data.options import UsageError, entry_point, option, parse
from fastchat_data.outputs import StagedDir, guard_dir
from recipes.core.checkpoint import verify_checkpoint
from recipes.core.config import ConfigError
from recipes.core.quiet import quiet, verbose_option, verbose_requested
from recipes.core.run_folder import RUN_INFO, CheckpointFolder, written_by_command

SIZE_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_size(text: str) -> int:
    """`2GB`, `500MB`, `1.5GB` or a byte count; anything else is a one-line error."""
    upper = text.strip().upper()
    for unit, factor in SIZE_UNITS.items():
        if upper.endswith(unit):
            number, scale = upper[: -len(unit)], factor
            break
    else:
        number, scale = upper, 1
    try:
        value = float(number)
    except ValueError:
        raise UsageError(f"--max_shard_size {text!r}: give a size such as 2GB or 500MB") from None
    if not (1 << 10 <= value * scale <= 1 << 50):
        raise UsageError(f"--max_shard_size {text!r}: between 1KB and 1PB")
    return int(value * scale)


def _write_dcp(dcp_dir: Path, out: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    from recipes.core.safe_load import SafeFileSystemReader, dcp_load

    meta = SafeFileSystemReader(dcp_dir).read_metadata().state_dict_metadata
    names = [k.removeprefix("model.") for k in meta if k.startswith("model.")]
    shard_keys: list[list[str]] = []  # names only: written shards leave memory
    current, size, total = {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            shard_keys.append(list(current))
            path = out / f".shard-{len(shard_keys)}.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
        current, size = {}, 0

    for name in names:
        info = meta[f"model.{name}"]
        tensor = torch.empty(info.size, dtype=info.properties.dtype)
        dcp_load({"model": {name: tensor}}, dcp_dir, no_dist=True)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"{dcp_dir.parent}: {name} holds non-finite values; not converted")
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor
        size, total = size + nbytes, total + nbytes
    flush()
    _name_shards(out, shard_keys, total)


def _name_shards(out: Path, keys_per_shard: list[list[str]], total_bytes: int) -> None:
    """Rename `.shard-i` files the way transformers names them, with an index when sharded."""
    n = len(keys_per_shard)
    if n == 1:
        (out / ".shard-1.safetensors").rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, keys in enumerate(keys_per_shard, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / f".shard-{i}.safetensors").rename(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _model_files(ckpt: CheckpointFolder, tmp: Path, max_shard_size: str) -> None:
    if ckpt.dcp.exists():
        _write_dcp(ckpt.dcp, tmp, parse_size(max_shard_size))
        return
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict

    from recipes.core.safe_load import deepspeed_loads_weights_only

    with deepspeed_loads_weights_only():  # zero_to_fp32 loads with weights_only=False
        convert_zero_checkpoint_to_state_dict(
            str(ckpt.deepspeed),
            str(tmp),
            tag="state",
            max_shard_size=max_shard_size,
            safe_serialization=True,
        )


def convert(
    checkpoint: str | Path,
    out: str | Path,
    model: str | None = None,
    *,
    max_shard_size: str = "2GB",
) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    from recipes.core.generate import save_for_inference

    ckpt = CheckpointFolder(Path(checkpoint))
    if not ckpt.path.is_dir() or not ckpt.trainer_state.exists():
        raise ConfigError(f"{checkpoint} is not a camelid checkpoint (no trainer_state.json)")
    # the output is never the checkpoint or the run folder holding it: refused before anything
    # is read from the checkpoint
    in_run = ckpt.path.parent.name == "checkpoints"  # RUN/checkpoints/step-N
    inputs = [ckpt.path, *([ckpt.path.parent.parent] if in_run else [])]
    guard_dir(out, inputs, "--out", marker=written_by_command("convert_checkpoint"))
    if not ckpt.complete.exists():
        raise ConfigError(
            f"{checkpoint} is incomplete (no {ckpt.complete.name} manifest): the run died while "
            "saving it"
        )
    problems = verify_checkpoint(ckpt)  # sizes, checksums, and no unsafe pickles
    if problems:
        raise ConfigError(f"{checkpoint} failed verification: {'; '.join(problems[:3])}")
    state = json.loads(ckpt.trainer_state.read_text())
    config = state.get("config", {})
    model = model or state.get("model_path") or config.get("model_name_or_path")
    if not model or not Path(model).is_dir():
        raise ConfigError(
            f"base model folder {model} not found (it gives config and tokenizer); pass --model"
        )
    adapter = config.get("peft_method", "none") != "none"
    if adapter and not ckpt.adapter.exists():
        raise ConfigError(
            f"{checkpoint} is an adapter run under DeepSpeed: convert the run's "
            "exported adapter (OUT/adapter) instead"
        )
    # the output is never the checkpoint, the run folder holding it, or the base model
    staged = StagedDir(
        out,
        inputs=[ckpt.path, ckpt.path.parent.parent, model],
        marker=written_by_command("convert_checkpoint"),
    )
    info = {
        "written_by": "convert_checkpoint",
        "converted_from": str(ckpt.path),
        "step": state.get("step"),
        "base_model": str(model),
    }
    with staged as tmp:
        if adapter:
            shutil.copytree(ckpt.adapter, tmp, dirs_exist_ok=True)
        else:
            _model_files(ckpt, tmp, max_shard_size)
            AutoConfig.from_pretrained(model).save_pretrained(tmp)
        template = config.get("template", "vicuna_v1.1")
        info["template"] = template
        info.update(save_for_inference(AutoTokenizer.from_pretrained(model), template, tmp))
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False))
    return staged.final


@dataclass
class ConvertOptions:
    """A camelid checkpoint as a plain Hugging Face folder."""

    checkpoint: str = option(help="a checkpoints/step-N folder", positional=True)
    out: str = option(help="the Hugging Face folder to write (a new one)", positional=True)
    model: str | None = option(
        None, "base model folder for config and tokenizer; none: the run's own"
    )
    max_shard_size: str = option("2GB", "largest weight file (safetensors shards), e.g. 500MB")
    verbose: bool = verbose_option()


@entry_point
def main(argv: list[str] | None = None) -> int:
    quiet(verbose_requested(argv))
    a = parse(
        ConvertOptions, argv, prog="python -m recipes.convert_checkpoint", description=__doc__
    )
    parse_size(a.max_shard_size)
    print(f"converted: {convert(a.checkpoint, a.out, a.model, max_shard_size=a.max_shard_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
