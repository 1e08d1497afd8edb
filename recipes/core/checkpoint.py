"""Checkpoints: sharded, atomic, verified, never unpickled blindly; the run's identity; the
output directory's claim. Paths come from recipes/core/run_folder.py, writes go through the
one writer (fastchat_data/outputs.py).

A checkpoint is written by every rank into `checkpoints/.tmp-step-N`, then its COMPLETE
manifest (every file with its size and sha256) is written and the folder swapped into
`checkpoints/step-N`; a run killed mid-save leaves only the staging folder, never resumed
from. On resume the newest checkpoint is verified (sizes, checksums, and every pickle through
the restricted loaders of recipes/core/safe_load.py); a damaged one is kept as
`damaged-step-N` and the previous one used. Nothing is ever deleted but by rotation
(`--save_total_limit`), which counts complete checkpoints only.

Safety: camelid's own state is JSON or safetensors. The pickles that torch DCP and DeepSpeed
write (DCP's .metadata, DeepSpeed's *.pt) are only ever read through restricted unpicklers,
at verification and again at load, so a checkpoint from someone else cannot run code.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastchat_data.io import cached_sha256
from fastchat_data.options import RunStopped
from fastchat_data.outputs import StagedDir

from . import parallel
from .config import RESUMABLE_CHANGES, ConfigError, data_paths
from .run_folder import CheckpointFolder, RunFolder
from .safe_load import UnsafeCheckpoint, check_pickle_file

# Settings that name where things are, not what is trained: a run's identity holds the
# content they point to instead (the data's sha256, the model's config and files).
PATH_SETTINGS = {"model_name_or_path", "data_path", "deepspeed", "cache_dir", "output_dir"}

# Settings that say how the work is split and run, not what is trained: the global batch is a
# function of the step and the global batch size alone (recipes/core/data.py), and every engine
# takes the same step for a given global batch (recipes/core/engines.py), so a run may resume
# under another strategy, world size, or split of its global batch. The identity holds the
# global batch size instead.
HOW_SETTINGS = {
    "strategy",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "sharded_load",
    "gradient_checkpointing",
    "loss_chunk_size",
}
# (the option --global_batch_size has this name too: run_identity replaces its value, which may
# be 0, by the global batch the run trains with)
GLOBAL_BATCH = "global_batch_size"


def acquire_run_lock(folder: RunFolder):
    """One job per output directory: an exclusive flock held by rank 0 for its lifetime (the
    kernel drops it when the process dies, even by kill -9, so a relaunch can resume)."""
    folder.root.mkdir(parents=True, exist_ok=True)
    handle = open(folder.lock, "a+")  # noqa: SIM115 - held open until the process exits
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        try:
            holder = json.loads(handle.read())
            who = (
                f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                f"{holder['command']}"
            )
        except (ValueError, KeyError):
            who = "a process that holds its lock"
        handle.close()
        raise ConfigError(
            f"{folder.root} is in use by another run ({who}); wait for it to end or choose "
            "another --output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv),
            }
        )
    )
    handle.flush()
    return handle


# ---------------------------------------------------------------------------- identity


def model_fingerprint(path: str | Path) -> str:
    """The weights a run starts from: config.json's content and the weight files by name and
    size (hashing a 70B model's bytes would take minutes; a retrained model in the same folder
    has new sizes or a new config only rarely, and then its content would be read)."""
    folder = Path(path)
    parts = [(folder / "config.json").read_text()] if (folder / "config.json").is_file() else []
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        parts.append(f"{f.name}:{f.stat().st_size}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def run_identity(cfg, model_path: str, global_batch_size: int) -> dict:
    """What makes two runs the same run: the settings (less where things are, how the work is
    split, and what a relaunch may change), the global batch size, the starting model, and the
    data's content."""
    settings = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in RESUMABLE_CHANGES | PATH_SETTINGS | HOW_SETTINGS
    }
    settings[GLOBAL_BATCH] = global_batch_size
    data = {Path(p).name: cached_sha256(p) for p in data_paths(cfg.data_path)}
    return {"settings": settings, "model": model_fingerprint(model_path), "data": data}


def saved_identity(state: dict) -> dict:
    """A checkpoint's identity as this version compares it. Checkpoints from before identities
    held the global batch size kept the split instead: their global batch is per device x
    accumulation x the processes that wrote them (every strategy then was data parallel)."""
    identity = dict(state["identity"])
    old = dict(identity.get("settings", {}))
    settings = {k: v for k, v in old.items() if k not in HOW_SETTINGS}
    if GLOBAL_BATCH not in settings and "per_device_train_batch_size" in old:
        settings[GLOBAL_BATCH] = (
            old["per_device_train_batch_size"]
            * old["gradient_accumulation_steps"]
            * state.get("world_size", 1)
        )
    identity["settings"] = settings
    return identity


def identity_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two identities, in words."""
    before, after = saved.get("settings", {}), now["settings"]
    changes = sorted(
        k for k in {**before, **after} if k != GLOBAL_BATCH and before.get(k) != after.get(k)
    )
    differ = ", ".join(f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in changes)
    out = [f"settings differ: {differ}"] if changes else []
    if before.get(GLOBAL_BATCH) != after.get(GLOBAL_BATCH):
        out.append(
            f"the global batch size differs: {before.get(GLOBAL_BATCH)} -> "
            f"{after.get(GLOBAL_BATCH)}"
        )
    if saved.get("model") != now["model"]:
        out.append("the starting model differs (its config.json or weight files)")
    old, new = saved.get("data", {}), now["data"]
    if old != new:
        edited = [n for n in new if n in old and old[n] != new[n]]
        if edited:
            out.append(
                f"the data changed: {', '.join(edited)} (sha256 {old[edited[0]][:12]}... "
                f"-> {new[edited[0]][:12]}...)"
            )
        if set(old) != set(new):
            out.append(
                f"the data files differ: {', '.join(sorted(old))} -> {', '.join(sorted(new))}"
            )
    return out


def claim_output_dir(cfg, folder: RunFolder, identity: dict) -> str | None:
    """Check that `folder` holds no checkpoint of another run. With --overwrite_output_dir the
    other run's checkpoints and metrics move aside (never deleted) and a note says where.
    Returns that note, or None. Called on rank 0 with the run lock held."""
    for stale in folder.incomplete_checkpoints():
        print(
            f"warning: {stale.path} has no {stale.complete.name} manifest (its save never "
            "finished): it is not resumed from, and kept",
            file=sys.stderr,
        )
    latest = folder.latest_checkpoint()
    if latest is None:
        return None
    try:
        saved = saved_identity(json.loads(latest.trainer_state.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: verification on resume reports it and falls back
    changes = identity_changes(saved, identity)
    if not changes:
        return None
    if cfg.overwrite_output_dir:
        aside = folder.replaced()
        aside.mkdir(parents=True)
        for path in (
            folder.checkpoints,
            folder.metrics,
            folder.trackers,
            folder.model,
            folder.adapter,
        ):
            if path.exists():
                os.replace(path, aside / path.name)
        return f"--overwrite_output_dir: the earlier run's checkpoints and metrics moved to {aside}"
    data = [c for c in changes if c.startswith("the data")]
    batch = [c for c in changes if c.startswith("the global batch")]
    other = [c for c in changes if c not in data + batch]
    allowed = (data if cfg.resume_with_changed_data else []) + (
        batch if cfg.allow_global_batch_change else []
    )
    refused = [c for c in changes if c not in allowed]
    was, now = saved["settings"].get(GLOBAL_BATCH), identity["settings"][GLOBAL_BATCH]
    if not refused:
        notes = []
        if data:
            notes.append(
                f"resuming on changed data ({'; '.join(data)}), as --resume_with_changed_data asks"
            )
        if batch:
            notes.append(
                f"resuming with another global batch size ({was} -> {now}), as "
                "--allow_global_batch_change asks: the step count and the learning-rate "
                "schedule continue; each step from now on trains the global batch of that "
                "step in the new batch size's data order (so this epoch may repeat or skip "
                "some samples), and epochs count the new steps per epoch"
            )
        return "; ".join(notes)
    # what to do: never --overwrite_output_dir, which moves the run's checkpoints out of reach
    if other:
        fix = (
            "relaunch with the run's settings, model and data to resume it, or give this "
            "run another --output_dir"
        )
    elif batch and not data:
        fix = (
            "resume with a global batch (per device x accumulation x data-parallel ranks) of "
            f"{was}{accumulation_hint(cfg, was, now)}, or change it deliberately with "
            "--allow_global_batch_change True"
        )
    elif data and not batch:
        fix = "restore the data, or continue on the new data with --resume_with_changed_data True"
    else:
        fix = (
            "restore the data and the global batch size, or allow both with "
            "--resume_with_changed_data True --allow_global_batch_change True"
        )
    raise ConfigError(
        f"{folder.root} holds checkpoints of another run ({'; '.join(refused)}): {fix}"
    )


def accumulation_hint(cfg, was: int, now: int) -> str:
    """The accumulation that gives the saved global batch on this job's ranks, if one does."""
    ranks = now // (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps)
    per_step = cfg.per_device_train_batch_size * ranks
    if not isinstance(was, int) or was % per_step:
        return ""
    return (
        f" (here: --gradient_accumulation_steps {was // per_step} with "
        f"--per_device_train_batch_size {cfg.per_device_train_batch_size})"
    )


# ---------------------------------------------------------------------------- RNG state


def save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {
        "python": json.dumps([version, list(mt), gauss]),
        "numpy": json.dumps([name, keys.tolist(), pos, has_gauss, cached]),
    }
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


# ---------------------------------------------------------------------------- verification


def checkpoint_files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name != "COMPLETE"
    )


def describe_files(folder: Path, names: list[str]) -> dict:
    from fastchat_data.io import sha256_file

    return {
        n: {"size": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names
    }


def _check_file(folder: Path, name: str, expected: dict) -> str | None:
    from fastchat_data.io import sha256_file

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


def verify_checkpoint(path: Path | CheckpointFolder, world=None) -> list[str]:
    """Problems found in a checkpoint (none: intact). Each rank checks its share of the files."""
    folder = path if isinstance(path, CheckpointFolder) else CheckpointFolder(Path(path))
    rank, size = (world.rank, world.size) if world else (0, 1)
    try:
        files = json.loads(folder.complete.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{folder.complete.name} is not a manifest of the checkpoint's files"]
    names = sorted(files)
    problems = [p for n in names[rank::size] if (p := _check_file(folder.path, n, files[n]))]
    if rank == 0:
        problems += [
            f"{n} is not in the manifest" for n in checkpoint_files(folder.path) if n not in files
        ]
    if world is not None:
        problems = [p for part in world.gather_objects(problems) for p in part]
    return sorted(problems)


def resumable_checkpoint(folder: RunFolder, world) -> CheckpointFolder | None:
    """The newest checkpoint that verifies. A damaged one is renamed damaged-step-N (kept for
    inspection, never deleted) with a message saying which file failed, and the one before
    it is tried."""
    found = folder.complete_checkpoints()
    world.barrier()  # every rank has listed before rank 0 renames anything
    for ckpt in reversed(found):
        problems = verify_checkpoint(ckpt, world)
        if not problems:
            return ckpt
        if world.main:
            kept = folder.damaged(ckpt)
            ckpt.path.rename(kept)
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            print(
                f"warning: checkpoint {ckpt.path} failed verification: {problems[0]}{more}; "
                f"kept as {kept.name}; trying the previous checkpoint",
                file=sys.stderr,
            )
        world.barrier()
    if found and world.main:
        print("warning: no intact checkpoint left; training starts from step 0", file=sys.stderr)
    return None


# ---------------------------------------------------------------------------- save and load


class WriteFailed(RunStopped):
    """A checkpoint or an export could not be written (a full disk, a vanished folder): the
    run stops with exit status 3; the previous checkpoint is intact and resumable."""

    exit_status = 3


def agree_written(world, error: OSError | None, what: str) -> None:
    """Every rank learns whether any failed to write its share, and all stop together (a
    rank that raised alone would leave the others waiting at the next collective)."""
    if world.all_sum(error is not None) > 0:
        why = f"{error.strerror or error} ({error.filename})" if error else "another rank failed"
        raise WriteFailed(
            f"{what} could not be written: {why}; free the space (or fix the folder) and "
            "relaunch to resume from the last checkpoint"
        )


def save_checkpoint(
    engine, world, folder: RunFolder, *, step: int, trainer_state: dict, keep: int
) -> CheckpointFolder:
    """Every rank writes its share into the staging folder; rank 0 writes the manifest and
    swaps the folder in, then rotates: the newest `keep` complete checkpoints stay (0: all),
    the one just written always among them. A failed write stops every rank together and
    leaves no staged folder behind."""
    final = folder.checkpoint(step)
    stage = StagedDir(
        final.path,
        marker=final.complete.name,
        flag="checkpoint",
        staging=folder.staging(step),
        owner=folder.root,
    )
    what = f"checkpoint {final.path}"
    error = None
    try:
        if world.main:
            stage.begin()
    except OSError as e:
        error = e
    agree_written(world, error, what)
    staged = CheckpointFolder(stage.staging)
    try:
        engine.save(staged)
        save_rng(staged.rng(world.rank))
        if world.main:
            state = {
                **trainer_state,
                "step": step,
                "world_size": world.size,
                "strategy": world.strategy.name,
            }
            staged.trainer_state.write_text(json.dumps(state, indent=2))
    except OSError as e:
        error = e
    try:
        agree_written(world, error, what)
    except WriteFailed:
        if world.main:
            stage.abort()
        raise
    names = checkpoint_files(staged.path)  # each rank checksums its share of the files
    parts = world.gather_objects(describe_files(staged.path, names[world.rank :: world.size]))
    if world.main:
        try:
            files = {k: v for part in parts for k, v in part.items()}
            with open(staged.complete, "w") as f:
                json.dump({"step": step, "files": dict(sorted(files.items()))}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            stage.commit()
            for old in folder.complete_checkpoints()[:-keep] if keep > 0 else []:
                shutil.rmtree(old.path, ignore_errors=True)
        except OSError as e:
            error = e
            stage.abort()
    agree_written(world, error, what)
    return final


def checkpoint_format(ckpt: CheckpointFolder) -> str:
    """How a checkpoint holds its engine state: "dcp", "deepspeed" or "adapter"."""
    if ckpt.deepspeed.is_dir():
        return "deepspeed"
    return "adapter" if ckpt.adapter.is_dir() else "dcp"


def load_route(ckpt: CheckpointFolder, state: dict, world) -> str:
    """How this job's engine restores a checkpoint: "native" (its own format: DCP reshards to
    any torch strategy and world size, an adapter is whole, DeepSpeed's files need the same ZeRO
    stage and world size), "dcp" (a torch checkpoint into ZeRO, parameter by parameter) or
    "universal" (DeepSpeed's files made universal first, into any engine). An adapter
    checkpoint under DeepSpeed is refused in one line."""
    writer, ours = parallel.get(state["strategy"]), world.strategy
    fmt = checkpoint_format(ckpt)
    if fmt == "adapter":
        if ours.checkpoint_format == "dcp":
            return "native"
        able = [s.name for s in parallel.STRATEGIES.values() if s.checkpoint_format == "dcp"]
        raise ConfigError(
            f"{ckpt.path} holds an adapter written by {writer.name}; {ours.name} cannot "
            f"restore it: resume it with strategy {' or '.join(able)} (any number of processes)"
        )
    if fmt == "dcp":
        return "native" if ours.checkpoint_format == "dcp" else "dcp"
    native = (
        ours.checkpoint_format == "deepspeed"
        and writer.zero_stage == ours.zero_stage
        and state["world_size"] == world.size
    )
    return "native" if native else "universal"


def load_universal(engine, world, ckpt: CheckpointFolder, *, state: dict) -> None:
    """DeepSpeed's files into another ZeRO stage, world size or engine: rank 0 converts them
    with DeepSpeed's own converter into checkpoints/.universal-step-N (a shared file system
    across nodes), every rank reads it, rank 0 removes it. The checkpoint is left as it is."""
    from .engines import UniversalParams, deepspeed_to_universal

    tmp = ckpt.path.parent / f".universal-{ckpt.path.name}"
    error = None
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)  # a conversion a kill interrupted
        try:
            deepspeed_to_universal(ckpt, tmp)
        except Exception as e:  # noqa: BLE001 - any failure of DeepSpeed's converter, in one line
            error = e
    if world.all_sum(error is not None) > 0:
        why = " ".join(str(error).split())[:200] if error else "on rank 0"
        raise ConfigError(
            f"{ckpt.path}: DeepSpeed could not convert its files for {world.strategy.name} x "
            f"{world.size} ({type(error).__name__ if error else 'failed'}: {why}); resume it "
            f"with --strategy {state['strategy']} on {state['world_size']} processes"
        )
    try:
        engine.load_params(UniversalParams(tmp, ckpt))
    finally:
        world.barrier()
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)


def load_rng_for(ckpt: CheckpointFolder, state: dict, world) -> str | None:
    """Each rank's random state. Rank r restores the writer's rank r; a rank the writer did not
    have is seeded from (seed, step, rank), so its stream is new but reproducible. Data order
    never depends on these (recipes/core/data.py): only dropout does. Returns a note when some
    rank could not continue its stream."""
    if world.rank < state["world_size"]:
        load_rng(ckpt.rng(world.rank))
    else:
        seed = int(state.get("config", {}).get("seed", 0))
        entropy = np.random.SeedSequence([seed, state["step"], world.rank]).generate_state(2)
        mixed = int(entropy[0]) << 32 | int(entropy[1])
        random.seed(mixed)
        np.random.seed(entropy[0])
        torch.manual_seed(mixed)
    if world.size > state["world_size"]:
        new = list(range(state["world_size"], world.size))
        which = f"rank {new[0]}" if len(new) == 1 else f"ranks {new[0]}..{new[-1]}"
        return (
            f"{which} start(s) a new random stream (seeded from the seed, the step and the "
            "rank): only dropout draws from it"
        )
    return None


def continue_schedule(scheduler) -> None:
    """The learning rate of the step about to run, from the schedule this job planned (its
    total steps): a relaunch with a larger --max_steps follows the new schedule from its next
    step on, instead of applying the rate the old schedule left in the optimizer first. With
    the same total steps this computes the rate the saved schedule holds."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    rates = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports (torch keeps it there)


def load_checkpoint(engine, world, ckpt: CheckpointFolder) -> dict:
    """Restore a verified checkpoint (see resumable_checkpoint) into the engine and RNGs. The
    returned state carries "notes": what a move to another world size changed."""
    state = json.loads(ckpt.trainer_state.read_text())
    route = load_route(ckpt, state, world)
    if route == "native":
        engine.load(ckpt)
    elif route == "dcp":
        from .engines import DcpParams

        engine.load_params(DcpParams(ckpt))
    else:
        load_universal(engine, world, ckpt, state=state)
    continue_schedule(engine.scheduler)
    note = load_rng_for(ckpt, state, world)
    state["notes"] = [note] if note else []
    if state["world_size"] != world.size or parallel.get(state["strategy"]) != world.strategy:
        state["notes"].insert(
            0,
            f"moved: written by {state['strategy']} x {state['world_size']}, resumed by "
            f"{world.strategy.name} x {world.size}",
        )
    return state
