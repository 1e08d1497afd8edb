"""Checkpoints: sharded, atomic, resumable; and the final Hugging Face export.

Layout under output_dir:
  checkpoints/step-00000010/   one complete checkpoint (engine shards, trainer_state.json,
                               rng-rank*.pt, COMPLETE); written as .tmp-step-... and renamed
                               by rank 0 once every rank has finished, so a run killed
                               mid-save leaves only a .tmp folder that is never resumed from
  model/                       the exported model: config, tokenizer, sharded safetensors
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from fastchat_data.tiny import save_tokenizer

from .config import ConfigError, TrainConfig

COMPLETE = "COMPLETE"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoints_dir(output_dir)
    if not root.exists():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def check_output_dir(cfg: TrainConfig) -> None:
    """An output directory holding another run's checkpoints is an error, not a silent resume;
    with --overwrite_output_dir the old run's checkpoints and metrics go, so that a later
    relaunch can never resume from them."""
    if cfg.overwrite_output_dir:
        shutil.rmtree(checkpoints_dir(cfg.output_dir), ignore_errors=True)
        (Path(cfg.output_dir) / "metrics.jsonl").unlink(missing_ok=True)
        return
    ckpt = latest_checkpoint(cfg.output_dir)
    if ckpt is None:
        return
    saved = json.loads((ckpt / "trainer_state.json").read_text())
    if saved["run_fingerprint"] != cfg.run_fingerprint():
        changed = sorted(k for k, v in saved["config"].items() if getattr(cfg, k, None) != v)
        raise ConfigError(
            f"{cfg.output_dir} holds checkpoints of another run (settings differ: {', '.join(changed)}); "
            "choose another --output_dir or pass --overwrite_output_dir True"
        )


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, world, cfg: TrainConfig, step: int, trainer_state: dict) -> Path:
    root = checkpoints_dir(cfg.output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng-rank{world.rank}.pt")
    world.barrier()
    if world.main:
        state = {**trainer_state, "step": step, "world_size": world.size, "strategy": cfg.strategy,
                 "run_fingerprint": cfg.run_fingerprint(), "config": vars(cfg)}  # fmt: skip
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        (tmp / COMPLETE).write_text("")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in (
            complete_checkpoints(cfg.output_dir)[: -cfg.save_total_limit]
            if cfg.save_total_limit > 0
            else []
        ):
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def load_checkpoint(engine, world, path: Path) -> dict:
    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != world.size:
        raise ConfigError(
            f"{path} was written by {state['world_size']} ranks; resume it with the same number"
        )
    engine.load(path)
    set_rng_state(torch.load(path / f"rng-rank{world.rank}.pt", weights_only=False))
    return state


RUN_INFO = "camelid.json"  # beside an export: how it was trained (the template chat must use)


def export_hf(engine, world, tokenizer, out_dir: Path, max_shard_size: str = "2GB",
              info: dict | None = None) -> Path | None:  # fmt: skip
    """The final model as a plain Hugging Face folder (safetensors, sharded by size), written by
    rank 0 from a state dict gathered onto its CPU. Loads with no camelid import."""
    state_dict = engine.full_state_dict()  # collective: every rank takes part
    if world.main:
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.config.use_cache = True
        # save_pretrained takes the gathered state dict; the (sharded) live module gives the config.
        engine.module.save_pretrained(
            tmp, state_dict=state_dict, safe_serialization=True, max_shard_size=max_shard_size
        )
        save_tokenizer(tokenizer, tmp)
        (tmp / RUN_INFO).write_text(json.dumps(info or {}, indent=2, ensure_ascii=False))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    world.barrier()
    return out_dir if world.main else None
