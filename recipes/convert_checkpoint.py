"""Offline: a sharded camelid checkpoint -> a plain Hugging Face folder.

    python -m recipes.convert_checkpoint OUT/checkpoints/step-00001000 converted/ [--max_shard_size 2GB]

Works without the GPUs or the process count of the run. Memory stays bounded by one output
shard (plus the tensor being read): DCP checkpoints (single / DDP / FSDP) are read one tensor
at a time from their metadata; ZeRO checkpoints go through DeepSpeed's own lazy converter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from recipes.core.checkpoint import COMPLETE, verify_checkpoint

SIZE_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


class ConvertError(ValueError):
    pass


def parse_size(text: str) -> int:
    for unit, factor in SIZE_UNITS.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


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
            save_file(
                current,
                str(out / f".shard-{len(shard_keys)}.safetensors"),
                metadata={"format": "pt"},
            )
        current, size = {}, 0

    for name in names:
        info = meta[f"model.{name}"]
        tensor = torch.empty(info.size, dtype=info.properties.dtype)
        dcp_load({"model": {name: tensor}}, dcp_dir, no_dist=True)
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


def convert(
    checkpoint: str | Path, out: str | Path, model: str | None = None, max_shard_size: str = "2GB"
) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    from fastchat_data.io import save_tokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    state_file = checkpoint / "trainer_state.json"
    if not state_file.exists():
        raise ConvertError(f"{checkpoint} is not a camelid checkpoint (no trainer_state.json)")
    if not (checkpoint / COMPLETE).exists():
        raise ConvertError(
            f"{checkpoint} is incomplete (no {COMPLETE} marker): the run died while saving it"
        )
    problems = verify_checkpoint(checkpoint)  # sizes, checksums, and no unsafe pickles
    if problems:
        raise ConvertError(f"{checkpoint} failed verification: {'; '.join(problems[:3])}")
    state = json.loads(state_file.read_text())
    model = model or state.get("model_path") or state["config"].get("model_name_or_path")
    if not model or not Path(model).exists():
        raise ConvertError(
            f"base model folder {model} not found (it gives config and tokenizer); pass --model"
        )
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    max_bytes = parse_size(max_shard_size)
    if (checkpoint / "dcp").exists():
        _write_dcp(checkpoint / "dcp", tmp, max_bytes)
    elif (checkpoint / "deepspeed").exists():
        from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict

        from recipes.core.safe_load import deepspeed_loads_weights_only

        with deepspeed_loads_weights_only():  # zero_to_fp32 loads with weights_only=False
            convert_zero_checkpoint_to_state_dict(
                str(checkpoint / "deepspeed"),
                str(tmp),
                max_shard_size=max_shard_size,
                safe_serialization=True,
                tag="state",
            )
    else:
        raise ConvertError(f"{checkpoint} holds neither DCP nor DeepSpeed shards")
    AutoConfig.from_pretrained(model).save_pretrained(tmp)
    save_tokenizer(AutoTokenizer.from_pretrained(model), tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("checkpoint", help="a checkpoints/step-N folder")
    ap.add_argument("out", help="the Hugging Face folder to write")
    ap.add_argument(
        "--model",
        default=None,
        help="base model folder for config and tokenizer (default: the run's)",
    )
    ap.add_argument("--max_shard_size", default="2GB")
    args = ap.parse_args(argv)
    try:
        print(f"converted: {convert(args.checkpoint, args.out, args.model, args.max_shard_size)}")
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
