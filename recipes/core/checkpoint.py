"""Checkpoints: sharded, atomic, verified, never unpickled blindly; and the final export.

Layout under output_dir:
  run.lock                     held by the running job's rank 0: a second job into the same
                               directory refuses, naming the first
  checkpoints/step-00000010/   one complete checkpoint: engine shards, trainer_state.json,
                               rng-rank*.safetensors, scheduler.json, and COMPLETE, a manifest
                               of every file with its size and sha256. Written as .tmp-step-...
                               and renamed once every rank is done, so a run killed mid-save
                               leaves only a .tmp folder that is never resumed from
  checkpoints/damaged-step-N/  a checkpoint that failed verification on resume, kept for
                               inspection (never deleted silently)
  model/                       the exported model: config, tokenizer, sharded safetensors

Safety: camelid's own state is JSON or safetensors. The pickles that torch DCP and DeepSpeed
write (DCP's .metadata, DeepSpeed's *.pt) are only ever read through restricted unpicklers
(recipes/core/safe_load.py), at verification and again at load, so a checkpoint from someone
else cannot run code on resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastchat_data.io import save_tokenizer, sha256_file

from .config import ConfigError, TrainConfig
from .safe_load import UnsafeCheckpoint, check_pickle_file

COMPLETE = "COMPLETE"  # the manifest; written last, so its presence means every file is there
LOCK = "run.lock"
STEP_DIR = re.compile(r"step-(\d+)")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoints_dir(output_dir)
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def acquire_run_lock(output_dir: str | Path):
    """One job per output directory: an exclusive flock held by rank 0 for its lifetime (the
    kernel drops it when the process dies, even by kill -9, so a relaunch can resume)."""
    path = Path(output_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held open until the process exits
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        try:
            holder = json.loads(handle.read())
            who = f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
        except (ValueError, KeyError):
            who = "a process that holds its lock"
        handle.close()
        raise ConfigError(
            f"{output_dir} is in use by another run ({who}); wait for it to end or choose another --output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "command": " ".join(sys.argv)}))  # fmt: skip
    handle.flush()
    return handle


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
    try:
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        fingerprint, config = saved["run_fingerprint"], saved["config"]
    except (OSError, ValueError, KeyError):
        return  # a damaged checkpoint: verification on resume reports it and falls back
    if fingerprint != cfg.run_fingerprint():
        changed = sorted(k for k, v in config.items() if getattr(cfg, k, None) != v)
        raise ConfigError(
            f"{cfg.output_dir} holds checkpoints of another run (settings differ: {', '.join(changed)}); "
            "choose another --output_dir or pass --overwrite_output_dir True"
        )


# ---- state that camelid writes itself: JSON and safetensors, never pickles


def save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {"python": json.dumps([version, list(mt), gauss]),
            "numpy": json.dumps([name, keys.tolist(), pos, has_gauss, cached])}  # fmt: skip
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    version, mt, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def save_json_state(state: dict, path: Path) -> None:
    """A scheduler's state_dict (numbers and lists) as JSON."""
    path.write_text(json.dumps(state, indent=1))


def load_json_state(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- verification: a manifest of sizes and checksums, and pickles scanned before loading


def checkpoint_files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE
    )


def describe_files(folder: Path, names: list[str]) -> dict:
    return {
        n: {"size": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names
    }


def _check_file(folder: Path, name: str, expected: dict) -> str | None:
    path = folder / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{name} has {size:,} bytes, the manifest says {expected['size']:,}"
    if sha256_file(path) != expected["sha256"]:
        return f"{name} does not match its checksum (damaged)"
    try:
        check_pickle_file(path)  # the loaders a resume uses, on the file as it is now
    except UnsafeCheckpoint as e:
        return str(e)
    return None


def verify_checkpoint(folder: Path, world=None) -> list[str]:
    """Problems found in `folder` (none: intact). Each rank checks its share of the files."""
    rank, size = (world.rank, world.size) if world else (0, 1)
    try:
        files = json.loads((folder / COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{COMPLETE} is not a manifest of the checkpoint's files"]
    names = sorted(files)
    problems = [p for n in names[rank::size] if (p := _check_file(folder, n, files[n]))]
    if rank == 0:
        problems += [
            f"{n} is not in the manifest" for n in checkpoint_files(folder) if n not in files
        ]
    if world is not None:
        problems = [p for part in world.gather_objects(problems) for p in part]
    return sorted(problems)


def resumable_checkpoint(output_dir: str | Path, world) -> Path | None:
    """The newest checkpoint that verifies. A damaged one is renamed damaged-step-N (kept for
    inspection, never deleted) with a message saying which file failed, and the one before
    it is tried."""
    found = complete_checkpoints(output_dir)
    world.barrier()  # every rank has listed before rank 0 renames anything
    for folder in reversed(found):
        problems = verify_checkpoint(folder, world)
        if not problems:
            return folder
        if world.main:
            kept = folder.with_name(f"damaged-{folder.name}")
            while kept.exists():
                kept = kept.with_name(kept.name + "+")
            folder.rename(kept)
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            print(f"warning: checkpoint {folder} failed verification: {problems[0]}{more}; "
                  f"kept as {kept.name}; trying the previous checkpoint", file=sys.stderr)  # fmt: skip
        world.barrier()
    if found and world.main:
        print("warning: no intact checkpoint left; training starts from step 0", file=sys.stderr)
    return None


def save_checkpoint(engine, world, cfg: TrainConfig, step: int, trainer_state: dict) -> Path:
    root = checkpoints_dir(cfg.output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    engine.save(tmp)
    save_rng(tmp / f"rng-rank{world.rank}.safetensors")
    if world.main:
        state = {**trainer_state, "step": step, "world_size": world.size, "strategy": cfg.strategy,
                 "run_fingerprint": cfg.run_fingerprint(), "config": vars(cfg)}  # fmt: skip
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    world.barrier()
    names = checkpoint_files(tmp)  # each rank checksums its share of the files
    parts = world.gather_objects(describe_files(tmp, names[world.rank :: world.size]))
    if world.main:
        files = {k: v for part in parts for k, v in part.items()}
        with open(tmp / COMPLETE, "w") as f:
            json.dump({"step": step, "files": dict(sorted(files.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        # rotation: the checkpoint just written (checksummed above) is never among the deleted
        keep = max(cfg.save_total_limit, 1)
        for old in complete_checkpoints(cfg.output_dir)[:-keep] if cfg.save_total_limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def load_checkpoint(engine, world, path: Path) -> dict:
    """Restore a verified checkpoint (see resumable_checkpoint) into the engine and RNGs."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != world.size:
        raise ConfigError(
            f"{path} was written by {state['world_size']} ranks; resume it with the same number"
        )
    engine.load(path)
    load_rng(path / f"rng-rank{world.rank}.safetensors")
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
        info = dict(info or {})
        if info.get("template") is not None:  # the chat template and stop tokens, for any tool
            from .generate import save_for_inference

            info.update(save_for_inference(tokenizer, info["template"], tmp))
        else:
            save_tokenizer(tokenizer, tmp)
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    world.barrier()
    return out_dir if world.main else None
