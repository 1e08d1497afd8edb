"""Loading a full model without N copies of it: what decides whether a large run can start.

- FSDP2 (all its variants): the model is built on the meta device (parameters only; buffers
  such as rotary `inv_freq` are computed for real), sharded, materialised as this rank's
  shards, and each rank reads only its own rows of each tensor from the safetensors files,
  straight into its shard. No rank ever holds the whole model, on CPU or GPU.
- ZeRO-3: the model is built inside `deepspeed.zero.Init`, so parameters are partitioned as
  they are created, and each rank reads only its partition of each tensor from the files.
- single, DDP, ZeRO-2 hold a full copy per rank by design, loaded once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .config import ConfigError, scaled_config
from .ds_config import deepspeed_config


def load_model(model_path: str, cfg, world):
    """The causal LM for the world's strategy, in fp32. Under FSDP2 it comes back on the meta
    device, to be sharded and filled by the engine (see fill_sharded)."""
    from transformers import AutoModelForCausalLM

    from .attention import attention_kwargs

    kwargs = {"dtype": torch.float32, **attention_kwargs(cfg)}
    config = scaled_config(model_path, getattr(cfg, "rope_scaling", None))  # --rope_scaling
    strategy = world.strategy
    sharded = cfg.sharded_load and strategy.sharded_load
    if sharded and strategy.fsdp:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        model.tie_weights()
        return model
    if sharded and strategy.engine == "deepspeed":
        import deepspeed
        from transformers.initialization import no_init_weights

        # Partitioned as constructed; then each rank reads only its partition from the files.
        # (transformers' own ZeRO-3 path, HfDeepSpeedConfig + from_pretrained, reads every
        # checkpoint file whole on every rank: N copies of the model while loading.)
        ds_config = deepspeed_config(cfg, config.hidden_size)
        # no_init_weights: transformers' switch for exactly this (weights loaded right after)
        # no_init_weights first: entering it imports transformers' modeling code, which must
        # happen before zero.Init replaces torch's tensor constructors
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        model.tie_weights()
        fill_zero3_partitions(model, model_path)
        return model
    return AutoModelForCausalLM.from_pretrained(model_path, config=config, **kwargs)


def weight_files(model_path: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or sharded index)."""
    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in names.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise ConfigError(
            f"{folder}: no model.safetensors(.index.json); sharded loading reads "
            "safetensors (pass --sharded_load False to load other formats)"
        )
    return dict.fromkeys(safetensors_header(single)[0], single)


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The file's tensor table (name -> dtype, shape, data_offsets) and where the data starts:
    an 8-byte little-endian header length, then the JSON header (the safetensors format)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_elements(f, entry: dict, data_start: int, *, first: int, out: torch.Tensor) -> None:
    """Elements first .. first + out.numel() of one tensor (row-major), read with plain file
    reads straight into `out` (through a buffer of that size when dtype or device differ).

    Why not safe_open(...).get_slice: it reads through an mmap, and every page it touches
    counts in the rank's resident memory until the file closes, doubling the load-phase peak
    (the shard plus the mapped rows); page-cache reads are not resident in the process."""
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    f.seek(data_start + entry["data_offsets"][0] + first * dtype.itemsize)
    direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
    target = out if direct else torch.empty(out.shape, dtype=dtype)
    view = target.reshape(-1).view(torch.uint8).numpy()  # bytes view: works for bf16 too
    if f.readinto(view) != view.nbytes:
        raise ConfigError(f"{f.name}: truncated tensor data")
    if not direct:
        out.copy_(target)


def _tensors_by_file(model, model_path: str) -> dict[Path, list[tuple[str, torch.nn.Parameter]]]:
    files = weight_files(model_path)
    params = dict(model.named_parameters())  # a tied weight appears once, under its first name
    missing = [n for n in params if n not in files]
    if missing:
        raise ConfigError(
            f"{model_path}: the checkpoint has no tensor for {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}"
        )
    by_file: dict[Path, list] = {}
    for name, param in params.items():
        by_file.setdefault(files[name], []).append((name, param))
    return by_file


def _check_shape(file: Path, name: str, entry: dict, *, shape) -> None:
    if tuple(entry["shape"]) != tuple(shape):
        raise ConfigError(
            f"{file}: {name} has shape {entry['shape']}, the model expects {list(shape)}"
        )


@torch.no_grad()
def fill_zero3_partitions(model, model_path: str) -> None:
    """ZeRO-3 keeps each parameter flattened, rank r holding elements [r*P, (r+1)*P) in
    `param.ds_tensor` (P = ceil(numel / ranks), the last partition padded): read that range."""
    import torch.distributed as dist

    for file, named in _tensors_by_file(model, model_path).items():
        header, data_start = safetensors_header(file)
        with open(file, "rb") as f:
            for name, param in named:
                _check_shape(file, name, header[name], shape=param.ds_shape)
                part = param.ds_tensor
                first = dist.get_rank(group=param.ds_process_group) * part.numel()
                count = max(0, min(part.numel(), param.ds_numel - first))
                if count:
                    read_elements(
                        f, header[name], data_start, first=first, out=part.view(-1)[:count]
                    )


def _local_rows(param) -> tuple[torch.Tensor, int]:
    """This rank's shard of a FSDP2 parameter (a DTensor sharded on dim 0) and its first row."""
    from torch.distributed.tensor import Shard

    (placement,) = param.placements
    assert isinstance(placement, Shard) and placement.dim == 0, placement
    local = param.to_local()
    rows, rank, size = param.shape[0], param.device_mesh.get_local_rank(), param.device_mesh.size()
    per_rank = -(-rows // size)  # torch.chunk's split: ceil, the last ranks may get fewer
    return local, min(rank * per_rank, rows)


@torch.no_grad()
def fill_sharded(model, model_path: str, buffers: dict[str, torch.Tensor]) -> None:
    """After fully_shard + to_empty: read this rank's rows of every parameter from the files,
    and put back the buffers computed at construction (to_empty leaves them uninitialised)."""
    for file, named in _tensors_by_file(model, model_path).items():
        header, data_start = safetensors_header(file)
        with open(file, "rb") as f:
            for name, param in named:
                _check_shape(file, name, header[name], shape=param.shape)
                local, first = _local_rows(param)
                if local.numel():
                    row = math.prod(header[name]["shape"][1:])
                    read_elements(f, header[name], data_start, first=first * row, out=local)
    for name, buf in model.named_buffers():
        if name in buffers:
            buf.copy_(buffers[name])


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward, non-reentrant (what FSDP2 and
    ZeRO-3 need). transformers 5 renamed the switch; its old name warns on every call."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers releases before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
