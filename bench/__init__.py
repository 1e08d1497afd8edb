import json
import subprocess
import sys
from pathlib import Path

from fastchat_data.options import option
from fastchat_data.outputs import guard_file, write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _writable_result(path: str, flag: str) -> None:
    guard_file(path, flag=flag)  # a folder, a read-only file: refused before the benchmark runs


def result_option(name: str):
    """A benchmark's `--out` option: where its JSON result goes, bench/results/`name` unless
    told otherwise; one that cannot be written is refused when the options are read (and
    written through the same guard at the end: `_save`)."""
    return option(str(RESULTS / name), "the JSON result", check=_writable_result)


# How the benchmarks run a reference Hugging Face Trainer (TRL's trainers too) on this CPU:
# use_cpu, or each rank of a launched job trains alone; no checkpoints, trackers or progress bar
# inside the timed steps; the data read in-process, as camelid's loop reads it.
REFERENCE_TRAINER_ON_CPU = dict(
    use_cpu=True,
    save_strategy="no",
    report_to=[],
    disable_tqdm=True,
    dataloader_num_workers=0,
)


def _save(path, result) -> Path:
    """Through camelid's one output writer: the JSON appears whole or not at all, and a --out
    that is a folder or read-only is one line, not a traceback."""
    write_text(path, json.dumps(result, indent=2))
    return Path(path)


def write_json(path, result) -> None:
    """A benchmark's result as JSON at `path` (folders made as needed), and where it went."""
    print(f"written: {_save(path, result)}")


def write_and_report(path, result: dict, report) -> None:
    """A timed benchmark's end: its result as JSON at `path`, its table (`report(result)`),
    then where the JSON went and the wall time it took (result["settings"]["wall_s"])."""
    out = _save(path, result)
    report(result)
    print(f"\nwritten: {out} ({result['settings']['wall_s']:.0f} s)")


def worker_result(module: str, args: list[str], env: dict, *, what: str) -> dict:
    """`python -m module --worker *args` in a fresh process (its imports, memory and threads are
    its own) from the repository root; the JSON its last stdout line holds. `what` names the
    run in the error when it fails."""
    res = subprocess.run(
        [sys.executable, "-m", module, "--worker", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def flags(**options) -> list[str]:
    """A recipe's command line from keyword options, in their order: `--name value` each, as
    strings. The benchmarks spell their recipe runs this way rather than as lists of pairs."""
    return [x for name, value in options.items() for x in (f"--{name}", str(value))]


def recipe_flags(model, data, cache, *, max_length, batch, accum, steps, **more) -> list[str]:
    """The command line the benchmarks run a recipe with: model, data, tokenized-set cache, row
    length, batch, accumulation and steps, no checkpoint within the run, no trackers, and a
    rerun overwriting its folder; `more` adds the benchmark's own options."""
    return flags(
        model_name_or_path=model,
        data_path=data,
        cache_dir=cache,
        model_max_length=max_length,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        save_steps=100_000,
        report_to="none",
        overwrite_output_dir=True,
        **more,
    )


def loop_run(cfg, model, data, *, plan, total_steps: int, objective: str = "sft"):
    """A Run of the shared loop in this process, ready for recipes.core.loop.train_step: the
    world `cfg.strategy` declares, the objective from its registry, the engine from
    make_engine. Nothing is written (no output folder claimed, no checkpoint, no run log): what
    the benchmarks time one optimizer step with."""
    from recipes.core import objectives
    from recipes.core.engines import make_engine
    from recipes.core.loop import Run
    from recipes.core.run_folder import RunFolder
    from recipes.core.world import init_world

    world = init_world(cfg.strategy)
    run = Run(
        cfg,
        world,
        RunFolder(Path(cfg.output_dir)),
        objectives.get(objective),
        data=data,
        plan=plan,
        total_steps=total_steps,
    )
    run.engine = make_engine(model, cfg, world, total_steps=total_steps)
    return run
