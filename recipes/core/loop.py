"""The training loop every recipe shares: a Run, one optimizer step, the loop with its
checkpoints and signal handling, and the end-of-run bookkeeping.

    prepare(cfg, objective)  process group, the output directory's claim, tokenizer, units
    start(run, model, engine) the objective's preparation, resume, the run log, signals
    train(run)               steps until the planned end, checkpoints, a stop on request
    finish(run)              peak memory, the loss curve, the process group down

SIGTERM or SIGINT (Ctrl-C) asks every rank to stop at the next step boundary: all ranks agree,
save a checkpoint, and the run ends with StoppedBySignal (exit status 75, "stopped,
resumable": relaunch the same command). A second Ctrl-C stops at once.
"""

from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastchat_data.options import RunStopped
from fastchat_data.templates import portable_template

from . import checkpoint, sequence_parallel
from .config import ConfigError, accumulation_for
from .data import BatchPlan
from .logging import PHASES, RunLog, check_trackers, peak_flops
from .run_folder import CheckpointFolder, RunFolder
from .world import World, init_world, shutdown


class NonFiniteError(RunStopped):
    """A step whose loss, gradient norm or updated weights are not finite, past the
    --max_bad_steps budget: exit status 3, nothing saved after it, nothing exported."""

    exit_status = 3


class StoppedBySignal(RunStopped):
    """SIGTERM / SIGINT: a checkpoint was saved at a step boundary; relaunch to resume."""

    exit_status = 75


class Hooks:
    """Points where a test (or a user's harness) can act on a run, passed to the recipe's
    main(); the default does nothing. Fault injection in the tests subclasses it
    (tests/fault_recipe.py) instead of the loop reading environment variables."""

    def started(self, run) -> None:
        """The run is set up (engine in place, checkpoint resumed), before the first step."""

    def loss(self, run, loss: torch.Tensor) -> torch.Tensor:
        """Each micro-batch's loss, before backward."""
        return loss

    def after_update(self, run) -> None:
        """Right after the optimizer applied a step, before the weights are checked."""

    def after_step(self, run) -> None:
        """After each optimizer step (and its checkpoint, if one was due)."""


@dataclass
class Run:
    cfg: object
    world: World
    folder: RunFolder
    objective: object
    hooks: Hooks = field(default_factory=Hooks)
    tokenizer: object = None
    engine: object = None
    plan: BatchPlan = None
    data: object = None
    total_steps: int = 0
    step: int = 0
    log: RunLog = None
    stop_requested: bool = False
    notes: list = field(default_factory=list)
    model_path: str = ""
    identity: dict = field(default_factory=dict)
    bad_steps: int = 0  # non-finite steps skipped so far (at most cfg.max_bad_steps)
    last_checkpoint: Path | None = None
    lock: object = None  # rank 0's hold on output_dir/run.lock
    form: object = None  # what is trained: the full model or an adapter (model_form.py)
    previous_handlers: dict = field(default_factory=dict)


def prepare(cfg, objective, notes: list[str] | None = None, *, hooks: Hooks | None = None) -> Run:
    """Process group, the output directory's claim, tokenizer, the training units, the batch
    plan. Nothing is written before the settings and the data are known to be usable."""
    if not cfg.model_name_or_path:
        raise ConfigError(
            "--model_name_or_path: give the model folder to train (a Hugging Face "
            "folder with config.json); `make demo` shows a tiny one"
        )
    if not cfg.data_path:
        raise ConfigError(f"--data_path: give the training data ({objective.units.noun})")
    sp = cfg.sequence_parallel_size  # objectives.refuse_unsupported: the objective splits rows
    world = init_world(cfg.strategy, sp)
    sequence_parallel.use_group(world.sp_group)
    # --global_batch_size: the accumulation for the ranks this job has (an elastic restart on
    # fewer nodes accumulates more), before anything reads it
    cfg.gradient_accumulation_steps = accumulation_for(cfg, world.dp_size)
    run = Run(
        cfg,
        world,
        RunFolder(Path(cfg.output_dir)),
        objective,
        hooks or Hooks(),
        notes=list(notes or []),
        model_path=str(cfg.model_name_or_path),
    )
    torch.manual_seed(cfg.seed)
    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run.tokenizer = load_tokenizer(run.model_path)
    run.data = objective.data(cfg, run.tokenizer, world)
    run.plan = BatchPlan(run.data.lengths, run.data.trained, cfg, world_size=world.dp_size)
    # as Trainer counts them: a fraction of an epoch's steps rounds up (1.5 x 3 steps -> 5)
    run.total_steps = (
        cfg.max_steps
        if cfg.max_steps > 0
        else math.ceil(cfg.num_train_epochs * run.plan.steps_per_epoch)
    )
    run.identity = checkpoint.run_identity(cfg, run.model_path, run.plan.global_size)
    if getattr(run.data, "packing", False) and len(run.data.units) == len(run.data.ds):
        run.notes.append(
            f"--packing True packed nothing: rows are capped at {run.data.row_tokens} tokens "
            f"(the longest conversation, or --packing_row_tokens) and no two of the "
            f"{len(run.data.ds)} conversations fit together; raise --packing_row_tokens "
            f"(up to --model_max_length {cfg.model_max_length}) to pack them"
        )

    def claim_output_dir():
        check_trackers(cfg.report_to)  # an unreachable tracker server: now, not in minutes
        run.lock = checkpoint.acquire_run_lock(run.folder)
        run.folder.declare_owned()
        note = checkpoint.claim_output_dir(cfg, run.folder, run.identity)
        if note:
            run.notes.append(note)

    world.main_first(claim_output_dir)
    if world.main:
        for note in run.notes:
            print(f"note: {note}", flush=True)
    return run


def load_tokenizer(path: str):
    """The model folder's tokenizer, or one line saying why it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        why = " ".join(str(e).split())[:200]
        raise ConfigError(
            f"model_name_or_path: {path}: its tokenizer cannot be loaded ({why}); "
            "a model folder holds its tokenizer (tokenizer.json, or tokenizer.model, "
            "with tokenizer_config.json)"
        ) from None


def start(run: Run, model, engine, *, what: str = "") -> Run:
    """The objective's preparation on the initial weights, then resume from the newest
    checkpoint that verifies, the run log, and the signal handlers."""
    cfg, world = run.cfg, run.world
    n_params = sum(logical_numel(p) for p in model.parameters())
    n_trained = sum(logical_numel(p) for p in model.parameters() if p.requires_grad)
    run.engine = engine
    run.objective.before_resume(run)
    resume_from = checkpoint.resumable_checkpoint(run.folder, world)
    if resume_from is not None:
        state = checkpoint.load_checkpoint(run.engine, world, resume_from)
        run.step, run.bad_steps = state["step"], state.get("bad_steps", 0)
        run.last_checkpoint = resume_from.path
        if world.main:
            print(f"resumed from {resume_from.path} (step {run.step})", flush=True)
            for note in state["notes"]:
                print(f"note: {note}", flush=True)
    if world.main:
        trained = f" ({n_trained / 1e6:.2f}M trained)" if n_trained != n_params else ""
        units = len(run.data.units)
        packed = f" in {units} packed rows" if getattr(run.data, "packing", False) else ""
        sp = world.dims.sp
        sp_words = f" (rows split over {sp}, {world.dp_size} data-parallel)" if sp > 1 else ""
        print(
            f"{world.strategy.name} on {world.size} x {world.device.type}{sp_words}: {what}"
            f"{n_params / 1e6:.1f}M parameters{trained}, {len(run.data.ds)} "
            f"{run.objective.units.noun}{packed}, {run.plan.steps_per_epoch} steps/epoch, "
            f"{run.total_steps} steps, global batch {run.plan.global_size}",
            flush=True,
        )
    record_rank(run)
    # MFU counts the forward+backward of all parameters (6N per token), frozen ones included
    run.log = RunLog(
        run.folder,
        world.main,
        run.total_steps,
        start_step=run.step,
        n_params=n_params,
        world_size=world.size,
        peak=peak_flops(cfg.peak_tflops),
        report_to=cfg.report_to,
        config=cfg,
    )
    install_signal_handlers(run)
    PHASES.next("train")
    run.hooks.started(run)
    return run


def install_signal_handlers(run: Run) -> None:
    """SIGTERM and the first SIGINT ask for a stop at the next step boundary; a second SIGINT
    stops at once (KeyboardInterrupt)."""

    def request_stop(signum, _frame):
        if signum == signal.SIGINT and run.stop_requested:
            raise KeyboardInterrupt
        run.stop_requested = True

    run.previous_handlers = {
        s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)
    }


def restore_signal_handlers(run) -> None:
    """What the process had before the run (a recipe run in-process leaves no trace)."""
    for signum, handler in getattr(run, "previous_handlers", {}).items():
        signal.signal(signum, handler)


def logical_numel(param) -> int:
    """Parameters a tensor stands for: a 4-bit bitsandbytes weight packs two per byte."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        return state.shape.numel()
    return getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 partitions hold a part


def record_rank(run: Run) -> None:
    """Each rank writes what it is and what it trains on first: the proof, for tests and for
    users, that N processes form one job and see different data (not N copies of one run)."""
    world = run.world
    ids = [int(i) for b in run.plan.micro_batches(run.step, world.dp_rank) for i in b]
    path = run.folder.rank_file(world.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    actual = torch.distributed.get_world_size() if world.distributed else 1
    path.write_text(
        json.dumps(
            {
                "rank": world.rank,
                "world_size": actual,
                "dp_rank": world.dp_rank,
                "sp_rank": world.sp_rank,
                "strategy": world.strategy.name,
                "device": str(world.device),
                "step": run.step,
                "sample_ids": ids,
            }
        )
    )


def train_step(run: Run) -> dict:
    """One optimizer step over this rank's micro-batches of the global batch `run.step`. A
    non-finite loss on any rank, or a non-finite gradient norm, leaves the weights untouched.
    The objective's statistics are summed over micro-batches and ranks."""
    engine, world, plan = run.engine, run.world, run.plan
    started = time.perf_counter()
    micro = plan.micro_batches(run.step, world.dp_rank)
    loss_sum, tokens, padded, bad_ids, stats = 0.0, 0, 0, [], {}
    for m, ids in enumerate(micro):
        batch = run.data.batch(ids)
        if world.dims.sp > 1:  # this rank's shard of each row; its sp group shares the batch
            batch = sequence_parallel.shard_batch(batch, world.dims.sp, world.sp_rank)
        batch = {k: v.to(world.device) for k, v in batch.items()}
        if world.sp_rank == 0:  # counted once per sp group
            tokens += int(run.data.lengths[ids].sum())  # real tokens, padding excluded
        padded += batch["input_ids"].numel()  # shards: they add up to the padded rows
        last = m == len(micro) - 1
        with engine.sync_gradients(last):
            loss, micro_stats = run.objective.loss(run, batch)
            loss = run.hooks.loss(run, loss)
            engine.backward(loss)
        value = loss.item()
        if not math.isfinite(value):
            bad_ids += [int(s) for u in ids for s in run.data.units[int(u)]]  # sample ids
        loss_sum += value
        for k, v in micro_stats.items():
            stats[k] = stats.get(k, 0.0) + float(v)
        if not last:
            engine.step(False)
    loss_finite = world.all_sum(len(bad_ids)) == 0  # every rank agrees before the update
    grad_norm, applied = engine.step(True, loss_finite)
    step_times = getattr(run.objective, "step_times", None)
    if step_times is not None:  # before the sums: each rank's own seconds, averaged over ranks
        stats.update(step_times(run, time.perf_counter() - started, stats))
    if applied:
        run.hooks.after_update(run)
    nonfinite = engine.nonfinite_weights() if applied else 0
    names = sorted(stats)
    loss, tokens, padded, nonfinite, *summed = world.all_sums(
        [loss_sum, tokens, padded, nonfinite, *(stats[k] for k in names)]
    )
    bad_samples = (
        []  # a set: the ranks of one sp group train on the same samples
        if loss_finite
        else sorted({i for part in world.gather_objects(bad_ids) for i in part})
    )
    return {
        "stats": dict(zip(names, summed)),
        "loss": loss,
        "tokens": int(tokens),
        "real_token_share": tokens / padded,
        "grad_norm": grad_norm,
        "applied": applied,
        "nonfinite_weights": int(nonfinite),
        "bad_samples": bad_samples,
    }


def check_finite(run: Run, out: dict) -> None:
    """A step that was not applied: skip it within the --max_bad_steps budget, else stop. A
    step whose update made weights non-finite always stops: nothing is saved after it."""
    kept = run.last_checkpoint or "none yet"
    if out["nonfinite_weights"]:
        raise NonFiniteError(
            f"step {run.step}: the update made {out['nonfinite_weights']} weight tensor(s) "
            f"non-finite (loss {out['loss']:.4g}, gradient norm {out['grad_norm']:.4g}); the "
            f"run stops and saves nothing from it (last good checkpoint: {kept}; nothing "
            "exported). Lower --learning_rate or raise --adam_epsilon"
        )
    if out["applied"]:
        return
    run.bad_steps += 1
    what = (
        f"loss {out['loss']} on samples {out['bad_samples'][:20]}"
        if out["bad_samples"]
        else f"gradient norm {out['grad_norm']}"
    )
    if run.bad_steps <= run.cfg.max_bad_steps:
        if run.world.main:
            print(
                f"warning: step {run.step}: non-finite {what}; step skipped, not applied "
                f"({run.bad_steps} of --max_bad_steps {run.cfg.max_bad_steps})",
                file=sys.stderr,
            )
        return
    raise NonFiniteError(
        f"step {run.step}: non-finite {what}; the step was not applied and the run stops "
        f"(last good checkpoint: {kept}; nothing exported). Lower --learning_rate, check those "
        f"samples, or allow skips with --max_bad_steps N"
    )


def save(run: Run) -> CheckpointFolder:
    trainer_state = {
        "total_steps": run.total_steps,
        "bad_steps": run.bad_steps,
        "identity": run.identity,
        "config": vars(run.cfg),
    }
    saved = checkpoint.save_checkpoint(
        run.engine,
        run.world,
        run.folder,
        step=run.step,
        trainer_state=trainer_state,
        keep=run.cfg.save_total_limit,
    )
    run.last_checkpoint = saved.path
    return saved


def train(run: Run) -> None:
    cfg = run.cfg
    while run.step < run.total_steps:
        lr = run.engine.lr  # the rate this step applies (as Trainer logs it), not the next one
        out = train_step(run)
        run.step += 1
        last = run.step == run.total_steps
        run.log.step(
            run.step,
            out["loss"],
            lr,
            grad_norm=out["grad_norm"],
            tokens=out["tokens"],
            real_share=out["real_token_share"],
            log=run.step % cfg.logging_steps == 0 or last,
            extra=out["stats"],
        )
        check_finite(run, out)
        stop = run.world.all_sum(run.stop_requested) > 0  # all ranks agree before saving
        if stop or run.step % cfg.save_steps == 0 or last:
            save(run)
        run.hooks.after_step(run)
        if stop and not last:
            raise StoppedBySignal(
                f"a stop was requested (SIGTERM or Ctrl-C): checkpoint {run.last_checkpoint} "
                f"saved at step {run.step}; relaunch the same command to resume"
            )


def run_info(run: Run) -> dict:
    """What an export records beside the weights: the template (as fields if custom), so chat
    and eval render prompts the way training did, and how it was trained."""
    return {
        "written_by": "recipe",
        "template": portable_template(run.cfg.template),
        "objective": run.objective.name,
        "steps": run.step,
        "base_model": run.model_path,
    }


def finish(run: Run) -> None:
    """Peak memory into this rank's record, the loss curve, and the process group down."""
    rank_file = run.folder.rank_file(run.world.rank)
    info = json.loads(rank_file.read_text())
    PHASES.next("done")
    info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info["phase_peak_rss_mb"] = {k: v["rss_mb"] for k, v in PHASES.peaks.items()}
    if torch.cuda.is_available():
        info["phase_peak_gpu_mb"] = {k: v["gpu_mb"] for k, v in PHASES.peaks.items()}
    rank_file.write_text(json.dumps(info))
    png = run.log.close()
    if run.world.main and png:
        print(f"loss curve: {png}")
    if run.world.main and run.bad_steps:
        print(
            f"note: {run.bad_steps} non-finite step(s) were skipped (--max_bad_steps "
            f"{run.cfg.max_bad_steps}); see the warnings above"
        )
    restore_signal_handlers(run)
    shutdown(run.world)
