"""The training loop every recipe shares: a Run, one optimizer step, the loop with its
checkpoints and SIGTERM handling, and the end-of-run bookkeeping.

A recipe builds its model its own way (full weights, or a quantized base with an adapter),
hands it to `start(run, model)`, then calls train(), its own save(), and finish().
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastchat_data.schema import DataError
from fastchat_data.templates import portable_template

from . import checkpoint
from .config import ConfigError, TrainConfig, load_config
from .data import BatchPlan, TrainData, default_model_and_data, load_train_set, pad_token_id
from .distributed import World, init_world, make_engine
from .logging import PHASES, RunLog, peak_flops


@dataclass
class Run:
    cfg: TrainConfig
    world: World
    tokenizer: object = None
    engine: object = None
    plan: BatchPlan = None
    data: TrainData = None
    total_steps: int = 0
    step: int = 0
    log: RunLog = None
    stop_requested: bool = False
    notes: list = field(default_factory=list)
    model_path: str = ""
    bad_steps: int = 0  # non-finite steps skipped so far (at most cfg.max_bad_steps)
    last_checkpoint: Path | None = None
    lock: object = None  # rank 0's hold on output_dir/run.lock
    # (run, micro-batch) -> (loss, additive statistics): the SFT loss unless a recipe sets one
    objective: object = None


class NonFiniteError(RuntimeError):
    """A step whose loss or gradient norm is not finite, past the --max_bad_steps budget."""


def sft_data(cfg: TrainConfig, data_path: str, tokenizer, world) -> TrainData:
    """Conversations, tokenized with assistant-only labels, one or several per row."""
    train_set, _ = load_train_set(cfg, data_path, tokenizer, world)
    return TrainData(train_set, cfg.packing, cfg.model_max_length, pad_token_id(tokenizer),
                     row_tokens=cfg.packing_row_tokens)  # fmt: skip


def prepare(cfg: TrainConfig, notes: list[str] | None = None, build_data=sft_data) -> Run:
    """Process group, output directory check, tokenizer, the cached training set, batch plan.
    `build_data(cfg, data_path, tokenizer, world)` gives the training units (TrainData)."""
    from transformers import AutoTokenizer

    world = init_world(cfg.strategy)
    run = Run(cfg, world, notes=notes or [])
    if world.main:
        for note in run.notes:
            print(f"note: {note}")

    def claim_output_dir():
        run.lock = checkpoint.acquire_run_lock(cfg.output_dir)
        checkpoint.check_output_dir(cfg)

    world.main_first(claim_output_dir)
    torch.manual_seed(cfg.seed)
    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    model_path, data_path = default_model_and_data(cfg, world)
    run.model_path = model_path
    run.tokenizer = AutoTokenizer.from_pretrained(model_path)
    run.data = build_data(cfg, data_path, run.tokenizer, world)
    run.plan = BatchPlan(run.data.lengths, run.data.trained, cfg, world.size)
    # as Trainer counts them: a fraction of an epoch's steps rounds up (1.5 x 3 steps -> 5)
    run.total_steps = (
        cfg.max_steps
        if cfg.max_steps > 0
        else math.ceil(cfg.num_train_epochs * run.plan.steps_per_epoch)
    )
    return run


def start(run: Run, model, engine=None, what: str = "", before_resume=None) -> Run:
    """Wrap `model` in the strategy's engine, resume from the newest complete checkpoint,
    open the run log. `what` describes the model in the start-up line; `before_resume(run)`
    runs on the initial weights (DPO's reference log-probabilities)."""
    cfg, world = run.cfg, run.world
    n_params = sum(logical_numel(p) for p in model.parameters())
    n_trained = sum(logical_numel(p) for p in model.parameters() if p.requires_grad)
    run.engine = engine or make_engine(model, cfg, world, run.total_steps, run.model_path)
    if before_resume is not None:
        before_resume(run)
    # rank 0 checked (or, overwriting, cleared) the output directory in prepare()
    resume_from = checkpoint.resumable_checkpoint(cfg.output_dir, world)
    if resume_from is not None:
        state = checkpoint.load_checkpoint(run.engine, world, resume_from)
        run.step, run.bad_steps = state["step"], state.get("bad_steps", 0)
        run.last_checkpoint = resume_from
        if world.main:
            print(f"resumed from {resume_from} (step {run.step})")
    if world.main:
        trained = f" ({n_trained / 1e6:.2f}M trained)" if n_trained != n_params else ""
        print(f"{cfg.strategy} on {world.size} x {world.device.type}: {what}{n_params / 1e6:.1f}M parameters{trained}, "
              f"{len(run.data.ds)} {getattr(run.data, 'noun', 'conversations')}{f' in {len(run.data.units)} packed rows' if cfg.packing else ''}, "
              f"{run.plan.steps_per_epoch} steps/epoch, {run.total_steps} steps, "
              f"global batch {run.plan.global_size}")  # fmt: skip
    record_rank(run)
    # MFU counts the forward+backward of all parameters (6N per token), frozen ones included
    run.log = RunLog(Path(cfg.output_dir), world.main, run.total_steps, run.step, n_params, world.size,
                     peak_flops(cfg.peak_tflops), cfg.report_to, cfg)  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: setattr(run, "stop_requested", True))
    PHASES.next("train")
    return run


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
    ids = [int(i) for b in run.plan.micro_batches(run.step, world.rank) for i in b]
    path = Path(run.cfg.output_dir) / "ranks" / f"rank{world.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    actual = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    path.write_text(json.dumps({"rank": world.rank, "world_size": actual, "device": str(world.device),
                                "step": run.step, "sample_ids": ids}))  # fmt: skip


# Fault injection for tests: "STEP" or "STEP:RANK" makes that step's loss NaN on one rank (all
# ranks if none is given), as a poisoned batch would.
INJECT_NAN = os.environ.get("CAMELID_INJECT_NAN_LOSS", "")


def _poisoned(step: int, rank: int) -> bool:
    if not INJECT_NAN:
        return False
    at, _, on_rank = INJECT_NAN.partition(":")
    return step == int(at) and (not on_rank or rank == int(on_rank))


def sft_objective(run: Run, batch: dict) -> tuple[torch.Tensor, dict]:
    """The causal-LM loss: a token sum divided by the whole global batch's trained tokens
    (num_items_in_batch), so micro-batches and ranks add up to the global mean."""
    global_tokens = run.plan.global_trained_tokens(run.step)
    # use_cache=False: no KV cache in training (with one, packed rows would not be detected)
    out = run.engine.forward(**batch, num_items_in_batch=global_tokens, use_cache=False)
    return out.loss, {}


def train_step(run: Run) -> dict:
    """One optimizer step over this rank's micro-batches of the global batch `run.step`. A
    non-finite loss on any rank, or a non-finite gradient norm, leaves the weights untouched.
    The objective's statistics are summed over micro-batches and ranks."""
    engine, world, plan = run.engine, run.world, run.plan
    objective = run.objective or sft_objective
    micro = plan.micro_batches(run.step, world.rank)
    loss_sum, tokens, padded, bad_ids, stats = 0.0, 0, 0, [], {}
    for m, ids in enumerate(micro):
        batch = {k: v.to(world.device) for k, v in run.data.batch(ids).items()}
        tokens += int(run.data.lengths[ids].sum())  # real tokens, padding excluded
        padded += batch["input_ids"].numel()
        last = m == len(micro) - 1
        with engine.sync_gradients(last):
            loss, micro_stats = objective(run, batch)
            if _poisoned(run.step + 1, world.rank):
                loss = loss * float("nan")
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
    names = sorted(stats)
    loss, tokens, padded, *summed = world.all_sums(
        [loss_sum, tokens, padded, *(stats[k] for k in names)]
    )
    return {
        "stats": dict(zip(names, summed)),
        "loss": loss,
        "tokens": int(tokens),
        "real_token_share": tokens / padded,
        "grad_norm": grad_norm,
        "applied": applied,
        "bad_samples": sorted(i for part in world.gather_objects(bad_ids) for i in part)
        if not loss_finite
        else [],
    }


def check_finite(run: Run, out: dict) -> None:
    """A step that was not applied: skip it within the --max_bad_steps budget, else stop."""
    if out["applied"]:
        return
    run.bad_steps += 1
    what = (f"loss {out['loss']} on samples {out['bad_samples'][:20]}" if out["bad_samples"]
            else f"gradient norm {out['grad_norm']}")  # fmt: skip
    if run.bad_steps <= run.cfg.max_bad_steps:
        if run.world.main:
            print(f"warning: step {run.step}: non-finite {what}; step skipped, not applied "
                  f"({run.bad_steps} of --max_bad_steps {run.cfg.max_bad_steps})", file=sys.stderr)  # fmt: skip
        return
    kept = run.last_checkpoint or "none yet"
    raise NonFiniteError(
        f"step {run.step}: non-finite {what}; the step was not applied and the run stops "
        f"(last good checkpoint: {kept}; nothing exported). Lower --learning_rate, check those "
        f"samples, or allow skips with --max_bad_steps N"
    )


# Testing aid: seconds to pause after each step, so that an external kill -9 lands at a
# chosen step of a tiny model whose steps take milliseconds.
STEP_DELAY = float(os.environ.get("CAMELID_STEP_DELAY", "0"))


def train(run: Run) -> None:
    cfg = run.cfg
    while run.step < run.total_steps:
        time.sleep(STEP_DELAY)
        lr = run.engine.lr  # the rate this step applies (as Trainer logs it), not the next one
        out = train_step(run)
        run.step += 1
        run.log.step(run.step, out["loss"], lr, out["grad_norm"], out["tokens"], out["real_token_share"],
                     log=run.step % cfg.logging_steps == 0 or run.step == run.total_steps, extra=out["stats"])  # fmt: skip
        check_finite(run, out)
        stop = run.world.all_sum(run.stop_requested) > 0  # all ranks agree before saving
        if stop or run.step % cfg.save_steps == 0 or run.step == run.total_steps:
            run.last_checkpoint = checkpoint.save_checkpoint(
                run.engine,
                run.world,
                cfg,
                run.step,
                {
                    "total_steps": run.total_steps,
                    "model_path": run.model_path,
                    "bad_steps": run.bad_steps,
                },  # fmt: skip
            )
        if stop:
            if run.world.main:
                print(
                    f"SIGTERM: saved a checkpoint at step {run.step}; relaunch the same command to resume"
                )
            raise SystemExit(0)


def run_info(run: Run) -> dict:
    """What an export records beside the weights: the template (as fields if custom), so chat
    and eval render prompts the way training did."""
    return {"template": portable_template(run.cfg.template)}


def finish(run: Run) -> None:
    """Peak memory into this rank's record, the loss curve, and the process group down."""
    rank_file = Path(run.cfg.output_dir) / "ranks" / f"rank{run.world.rank}.json"
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
        print(f"note: {run.bad_steps} non-finite step(s) were skipped (--max_bad_steps "
              f"{run.cfg.max_bad_steps}); see the warnings above")  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None, config_cls: type, setup, save, exported_what: str) -> None:
    """A recipe's command line: its config, then setup -> train -> save -> finish.

    Bad configuration or data stops with one message (from rank 0) and exit status 2 before
    anything trains; a non-finite step stops with exit status 3 and nothing exported."""
    try:
        cfg, notes = load_config(argv, cls=config_cls)
        run = setup(cfg, notes)
        train(run)
        PHASES.next("export")
        exported = save(run)
    except (ConfigError, DataError, NonFiniteError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 3 if isinstance(e, NonFiniteError) else 2
        if torch.distributed.is_initialized():
            if isinstance(e, NonFiniteError):  # every rank stops here: leave together, so that
                torch.distributed.barrier()  # no rank tears down while a peer still talks
            torch.distributed.destroy_process_group()
        raise SystemExit(code) from None
    finish(run)
    if exported:
        print(f"{exported_what}: {exported}")
