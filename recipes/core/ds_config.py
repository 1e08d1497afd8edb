"""The DeepSpeed JSON a run uses: ds_configs/<strategy>.json (or --deepspeed FILE) with its
"auto" values filled from the command line and the model, as Hugging Face's integration
fills them."""

from __future__ import annotations

import json
from pathlib import Path

from . import parallel
from .config import ZERO_AUTO_SIZES, ConfigError, read_structured

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def deepspeed_config(cfg, hidden_size: int | None = None) -> dict:
    """The DeepSpeed JSON with its "auto" values filled from the command line and the model's
    hidden size; a user's explicit number always wins. A precision block that contradicts the
    command line is an error, never silently used."""
    name = parallel.get(cfg.strategy).ds_config_name if cfg.strategy != "auto" else None
    path = Path(cfg.deepspeed) if cfg.deepspeed else DS_CONFIG_DIR / str(name)
    ds = read_structured(path, json.loads, "JSON")
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{path}: enables fp16, which camelid does not train in; use bf16")
    bf16 = ds.setdefault("bf16", {}).get("enabled", "auto")
    if bf16 != "auto" and bool(bf16) != cfg.bf16:
        raise ConfigError(
            f"{path}: bf16.enabled is {bf16} but the command line says --bf16 {cfg.bf16}"
        )
    ds["bf16"]["enabled"] = cfg.bf16
    ds.pop("fp16", None)
    fill = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"{path}: {key} is {ds[key]} but the command line says {value}")
    ds.pop("train_batch_size", None)  # derived; ZeRO-3 rejects a stale one
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)  # camelid passes the same torch AdamW + schedule to every strategy
    zero = ds.setdefault("zero_optimization", {})
    for key, size in ZERO_AUTO_SIZES.items():
        if zero.get(key) == "auto":
            if hidden_size:
                zero[key] = size(hidden_size)
            else:  # no model to size from: DeepSpeed's defaults
                del zero[key]
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
