"""Running recipes from tests. `command` and `launched` start a job as a user does, through
the launcher's one command builder (launch.train.job_command: torchrun or DeepSpeed's launcher);
`train` forks its processes from a warm interpreter (tests/forked.py), each its own process,
command line and rank, without ~5 s of imports per process."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from bench import flags  # noqa: F401  (the tests write command lines as the benchmarks do)
from launch.train import LaunchOptions, job_command
from recipes.core import parallel

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "full_finetune.py"
QLORA = REPO / "recipes" / "qlora.py"
DPO = REPO / "recipes" / "dpo.py"
REWARD = REPO / "recipes" / "reward.py"
GRPO = REPO / "recipes" / "grpo.py"
FAULTS = REPO / "tests" / "fault_recipe.py"
BY_SCRIPT = {RECIPE: "sft", QLORA: "qlora", DPO: "dpo", REWARD: "reward", GRPO: "grpo"}


# what a launcher tells its workers: never passed on from the test process to what it starts
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    return e


@functools.cache
def tiny_assets() -> tuple[str, str]:
    """The tiny Llama and the 400 identity conversations its tokenizer was trained on: what a
    recipe trains on in these tests when they name no model or data (built once, cached)."""
    from fastchat_data.identity import identity_conversations
    from fastchat_data.io import write_records
    from fastchat_data.tiny import TEMPLATE_WORDS, corpus_texts, tiny_model

    cache = REPO / ".cache"
    records = identity_conversations(n=400, seed=0)
    data = cache / "demo" / "identity.json"
    if not data.exists():
        write_records(data, records)
    texts = corpus_texts(records) + TEMPLATE_WORDS * 20
    return str(tiny_model("llama", "tiny", texts=texts, cache_dir=cache)), str(data)


def with_assets(args) -> list[str]:
    args = [str(a) for a in args]
    model, data = tiny_assets()
    if "--model_name_or_path" not in args:
        args += ["--model_name_or_path", model]
    if "--data_path" not in args:
        args += ["--data_path", data]
    return args


def program(recipe: Path = RECIPE, faults: dict | None = None) -> list[str]:
    """The script each process runs: the recipe's, or with `faults` tests/fault_recipe.py
    running it ({"nan_at": "3:1", "step_delay": 0.2})."""
    if not faults:
        return [str(recipe)]
    script = [str(FAULTS), "--recipe", BY_SCRIPT.get(Path(recipe), "sft")]
    for key, value in faults.items():
        script += [f"--{key}", str(value)]
    return [*script, "--"]


def recipe_args(out: Path, args) -> list[str]:
    """The recipe's own options: `args`, into `out`, with no tracker; without a model or data
    in `args`, the tiny Llama on identity data (tiny_assets)."""
    return ["--output_dir", str(out), "--report_to", "none", *with_assets(args)]


def worker_command(
    strategy: str, out: Path, *args, recipe: Path = RECIPE, faults: dict | None = None
) -> list[str]:
    """What one process runs: a plain python process."""
    script = program(recipe, faults)
    return [sys.executable, *script, "--strategy", strategy, *recipe_args(out, args)]


def command(
    strategy: str, nproc: int, out: Path, *args, recipe: Path = RECIPE, faults: dict | None = None
) -> list[str]:
    """The recipe on `nproc` processes under the strategy's own launcher (torchrun or
    DeepSpeed's), as a user starts it; one process runs as a plain python process."""
    if nproc == 1:
        return worker_command(strategy, out, *args, recipe=recipe, faults=faults)
    name = BY_SCRIPT.get(Path(recipe), "sft")  # another script: a harness that runs sft
    script = program(recipe, faults)
    opts = LaunchOptions(ngpu=nproc, strategy=strategy, recipe=name)
    return job_command(opts, recipe_args=recipe_args(out, args), program=script)


@functools.cache
def fork_server():
    """The warm interpreter runs are forked from (tests/forked.py), started once per test
    session; each run still gets its own processes, argv, folder and environment."""
    import atexit

    from forked import ForkServer

    server = ForkServer(env())
    atexit.register(server.close)
    return server


def train(
    strategy: str,
    nproc: int,
    out: Path,
    *args,
    check: bool = True,
    recipe: Path = RECIPE,
    faults: dict | None = None,
) -> subprocess.CompletedProcess:
    """The recipe on `nproc` processes, forked from the warm interpreter (tests/forked.py):
    one process as a plain python process would run, several as a one-node job whose workers
    get torchrun's environment (and DeepSpeed's --local_rank), connected through the strategy's
    process group. What the launchers themselves do (signals, kills, exit statuses, nodes) is
    tested through `command` and `launched`, which start them for real."""
    res = forked_job(
        worker_command(strategy, out, *args, recipe=recipe, faults=faults), strategy, nproc
    )
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def forked_job(
    argv: list[str], strategy: str, nproc: int, *, environ: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """`argv` as one process, or as a one-node job of `nproc` forked workers with torchrun's
    environment (and DeepSpeed's --local_rank where the strategy's launcher is DeepSpeed's)."""
    deepspeed = strategy != "auto" and parallel.get(strategy).launcher == "deepspeed"
    return fork_server().run(
        argv,
        cwd=REPO,
        timeout=timeout,
        env=environ or env(),
        nproc=nproc,
        local_rank_arg=deepspeed and nproc > 1,
    )


def losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def ranks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]


def complete_checkpoints(out: Path) -> list[Path]:
    from recipes.core.run_folder import RunFolder

    return [c.path for c in RunFolder(out).complete_checkpoints()]


def moved(src: Path, dst: Path, step: int) -> str:
    """A copy of run folder `src` at `dst` holding its checkpoints up to `step` (and its metrics,
    which a resume truncates to that step), returned as an odd spelling of its path: what a
    run that moves to another machine, strategy or world size starts from."""
    import shutil

    exports = {"model", "adapter", "ranks", "run.lock", "loss.png"}  # (checkpoints hold an adapter)
    shutil.copytree(src, dst, ignore=lambda d, names: exports & set(names) if d == str(src) else [])
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return f"{dst.parent}/./{dst.name}/"


def assert_same_curve(got: list[float], reference: list[float], at: int) -> None:
    """A moved run's losses after step `at` equal the uninterrupted run's within 1e-5."""
    assert len(got) == len(reference), (got, reference)
    worst = max(abs(a - b) for a, b in zip(got[at:], reference[at:]))
    print(f"max |loss - reference| over steps {at + 1}..{len(got)}: {worst:.1e}")  # (with -s)
    assert worst < 1e-5, (got, reference)


def launched(
    strategy: str, nproc: int, out: Path, *args, recipe: Path = RECIPE, faults: dict | None = None
) -> subprocess.CompletedProcess:
    """As `train`, through launch.train's own job runner (signals, exit statuses, one line per
    failure): what `python -m launch.train` does once it has built the command."""
    cmd = command(strategy, nproc, out, *args, recipe=recipe, faults=faults)
    script = str(FAULTS if faults else recipe)
    code = (
        "import json, sys; from launch.train import launch; "
        "command, strategy, nproc, script = sys.argv[1:]; "
        "sys.exit(launch(json.loads(command), strategy, int(nproc), script=script))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, json.dumps(cmd), strategy, str(nproc), script],
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
        timeout=900,
    )


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun starts its workers in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def llama_config(**overrides):
    """The tiny size's LlamaConfig (fastchat_data.tiny.SIZES, vocabulary 500) with `overrides`:
    the model tests build in-process, without a tokenizer."""
    from transformers import LlamaConfig

    from fastchat_data.tiny import SIZES

    return LlamaConfig(**{"vocab_size": 500, **SIZES["tiny"], **overrides})


def layer_saved_bytes(model, **inputs) -> int:
    """Bytes the first decoder layer of `model` saves for backward in a forward on `inputs`,
    parameters excluded, each storage counted once: what the planner's activation formula
    must equal."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, inside = {}, [False]

    def pack(t):
        if inside[0] and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    layer = model.model.layers[0]
    layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs, use_cache=False)
    return sum(saved.values())


def run_in_repo(
    argv: list, *, timeout: int = 600, input: str | None = None
) -> subprocess.CompletedProcess:
    """`argv` as a fresh process in the repository, with the tests' environment; output kept."""
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=timeout,
        input=input,
    )
