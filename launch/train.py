"""Launch any recipe on N processes: torchrun for the torch strategies (single, DDP, FSDP2), the
deepspeed launcher for ZeRO, as the strategy registry declares.

    python -m launch.train --ngpu 4 --strategy fsdp [--recipe sft|qlora|dpo] --model M --data D \
        [--config C] [--out O] [-- recipe options]

Without GPUs the same command starts NGPU CPU processes on gloo, through the same code path.
Multi-node: --nnodes/--node_rank/--master_addr (torchrun rendezvous) or --hostfile (deepspeed).
Elastic (torch strategies): `--nnodes MIN:MAX --max_restarts K` runs on any number of nodes in
the range; when a node is lost, torchrun's agent on each node left restarts its workers (up to
K times), which resume from the newest complete checkpoint. The launcher passes the recipe
--global_batch_size (the run's global batch on MAX nodes, checked to split over every count of
the range), so a restart on fewer nodes accumulates more and continues the same loss curve.
Node 0 hosts the rendezvous: the job survives the loss of any other node.
Paths are read from where the command runs. SIGTERM or Ctrl-C reaches every rank: each saves
a checkpoint at the next step boundary and the job exits with status 75 ("stopped,
resumable"); a second Ctrl-C stops at once. Exit statuses: 0 done, 2 bad input, 3 stopped on
a non-finite step, 75 stopped by a signal after saving, 128+N a rank killed by signal N.

`job_command()` is the one command builder: the tests and the benchmarks start jobs with it.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from fastchat_data.options import UsageError, entry_point, option, parse
from recipes.core import parallel
from recipes.core.recipe import RECIPES
from recipes.core.world import free_port

REPO = Path(__file__).resolve().parents[1]
STOPPED = 75  # EX_TEMPFAIL: stopped on request after saving a checkpoint; relaunch to resume


def job_command(
    opts: LaunchOptions, *, recipe_args: list[str], program: list[str] | None = None
) -> list[str]:
    """The command that starts --ngpu processes per node of --recipe under --strategy's
    launcher, with `recipe_args` (the recipe's own options, --strategy added). `program`
    replaces the recipe's script (a harness that runs the recipe, with its own arguments).
    --nnodes MIN:MAX makes an elastic torchrun job on MIN to MAX nodes; --max_restarts: how
    often torchrun's agent restarts the workers after a failure (a lost node), from the newest
    checkpoint, on the nodes that remain."""
    spec = parallel.get(opts.strategy) if opts.strategy != "auto" else None
    script = [*(program or [str(RECIPES[opts.recipe].path)]), "--strategy", opts.strategy]
    script += recipe_args
    fewest, most = node_range(opts)
    hostfile = resolved(opts.hostfile)
    # a fixed port is agreed across nodes; on one node a free one, so two jobs never collide
    port = opts.master_port or (29500 if most > 1 or hostfile else free_port())
    if spec is not None and spec.launcher == "deepspeed":
        # the launchers as modules of this interpreter: no console script needs to be on PATH
        # (an installed wheel's virtualenv, a cluster's module system)
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "critical"]
        if hostfile:
            launcher += [
                "--hostfile",
                hostfile,
                "--master_addr",
                opts.master_addr,
                "--master_port",
                str(port),
            ]
            if opts.no_ssh:  # this node only: run the same command on every node
                launcher += ["--no_ssh", "--node_rank", str(opts.node_rank)]
        else:
            launcher += ["--num_gpus", str(opts.ngpu), "--master_port", str(port)]
        return launcher + script
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    if most > 1:
        # node 0 hosts the rendezvous store (without is_host, whichever node binds the port
        # first would, and on one machine that is a race); the store outlives lost nodes
        # only on node 0, as torchrun's master does
        conf = f"is_host={int(opts.node_rank == 0)}"
        if most > fewest:  # elastic: how long a round waits for more nodes than the
            # minimum, and for a silent node (heartbeats each second) before going on without it
            conf += (
                f",last_call_timeout={opts.elastic_wait},keep_alive_interval=1,"
                f"keep_alive_max_attempt={max(1, opts.elastic_wait)}"
            )
        launcher += [
            "--nnodes",
            f"{fewest}:{most}" if most > fewest else str(fewest),
            "--node_rank",
            str(opts.node_rank),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"{opts.master_addr}:{port}",
            "--rdzv_id",
            opts.rdzv_id,
            "--rdzv_conf",
            conf,
        ]
    else:
        launcher += ["--standalone"]  # a free local port, chosen by torchrun
    if opts.max_restarts:
        launcher += ["--max_restarts", str(opts.max_restarts)]
    return launcher + ["--nproc_per_node", str(opts.ngpu)] + script


@dataclass
class LaunchOptions:
    """Launch a recipe on N processes per node."""

    ngpu: int = option(1, "processes per node (GPUs, or CPU processes without GPUs)")
    strategy: str = option("fsdp", f"how processes share the model: {', '.join(parallel.names())}")
    recipe: str = option("sft", f"the recipe to run: {', '.join(RECIPES)}")
    config: str | None = option(
        None, "a YAML recipe (default: the recipe's GPU YAML on GPUs, its tiny CPU YAML on CPU)"
    )
    model: str | None = option(
        None, "the model folder to start from: the recipe's --model_name_or_path"
    )
    data: str | None = option(
        None, "training data file(s), comma-separated: the recipe's --data_path"
    )
    out: str | None = option(
        None, "the run's folder: the recipe's --output_dir (default: the config's)"
    )
    nnodes: str = option(
        "1",
        "nodes (torchrun rendezvous): N, or MIN:MAX for an elastic job that runs on any number "
        "of nodes in that range (the global batch is kept: see --max_restarts)",
    )
    max_restarts: int = option(
        0,
        "torchrun restarts the job's workers up to this many times after a failure (a lost "
        "node): they resume from the newest checkpoint on the nodes that remain",
    )
    elastic_wait: int = option(
        30,
        "elastic --nnodes MIN:MAX: seconds a rendezvous waits for more nodes once MIN have "
        "joined (torchrun's last_call_timeout), and for a silent node before the others go on "
        "without it",
    )
    node_rank: int = option(0, "this node's rank among --nnodes")
    master_addr: str = option("127.0.0.1", "address of node 0")
    master_port: int | None = option(
        None, "port on node 0; none: a free port on one node, 29500 across nodes"
    )
    rdzv_id: str = option("camelid", "torchrun rendezvous id, the same on all nodes")
    hostfile: str | None = option(None, "deepspeed hostfile for multi-node ZeRO")
    no_ssh: bool = option(
        False,
        "ZeRO multi-node without ssh/pdsh: start this node's processes only (run on every "
        "node with its --node_rank; needs --hostfile)",
    )
    dry_run: bool = option(False, "print the command only")
    skip_preflight: bool = option(
        False, "on GPUs, start even if the memory planner says the strategy does not fit"
    )


def resolved(path: str | None) -> str | None:
    """A path as the caller means it: against the directory the command runs in."""
    return str(Path(path).expanduser().absolute()) if path else None


def node_range(opts: LaunchOptions) -> tuple[int, int]:
    """--nnodes as (fewest, most) nodes: N is (N, N), MIN:MAX an elastic range."""
    low, colon, high = opts.nnodes.partition(":")
    try:
        fewest, most = int(low), int(high if colon else low)
    except ValueError:
        raise UsageError(
            f"--nnodes {opts.nnodes!r}: give a node count N or an elastic range MIN:MAX"
        ) from None
    if not 1 <= fewest <= most:
        raise UsageError(f"--nnodes {opts.nnodes}: give 1 <= MIN <= MAX nodes")
    return fewest, most


def check(opts: LaunchOptions, gpus: int) -> None:
    if opts.recipe not in RECIPES:
        raise UsageError(f"--recipe {opts.recipe!r} is not one of {', '.join(RECIPES)}")
    try:
        strategy = parallel.get(opts.strategy)
    except parallel.UnknownStrategy as e:
        raise UsageError(f"--{e}") from None
    if opts.ngpu < 1:
        raise UsageError(f"--ngpu {opts.ngpu}: give at least 1 process")
    fewest, most = node_range(opts)
    if opts.max_restarts < 0:
        raise UsageError(f"--max_restarts {opts.max_restarts}: give 0 or more")
    if opts.elastic_wait < 0:
        raise UsageError(f"--elastic_wait {opts.elastic_wait}: give 0 or more seconds")
    if strategy.launcher == "deepspeed" and (most > fewest or opts.max_restarts):
        raise UsageError(
            f"--strategy {strategy.name} runs under the deepspeed launcher, which has no elastic "
            "node range or restarts; use --nnodes N without --max_restarts, or a torch strategy"
        )
    nodes, what = most, f"--nnodes {opts.nnodes}"
    if opts.hostfile and Path(opts.hostfile).is_file():  # with a hostfile, it names the nodes
        hosts = [x for x in Path(opts.hostfile).read_text().splitlines() if x.split("#")[0].strip()]
        nodes, what = len(hosts), f"the {len(hosts)} nodes of --hostfile {opts.hostfile}"
    if nodes < 1 or not 0 <= opts.node_rank < nodes:
        raise UsageError(f"--node_rank {opts.node_rank} of {what}: out of range")
    if gpus and opts.ngpu > gpus:
        raise UsageError(f"--ngpu {opts.ngpu} but this node has {gpus} GPUs")
    if not gpus and opts.ngpu > (os.cpu_count() or 1) * 4:
        raise UsageError(
            f"--ngpu {opts.ngpu} CPU processes on {os.cpu_count()} cores is more "
            "than this machine can run"
        )
    if not strategy.multi_process and opts.ngpu * most != 1:
        raise UsageError(
            f"--strategy {strategy.name} runs one process; use --ngpu 1 or another strategy"
        )
    if opts.no_ssh and not opts.hostfile:
        raise UsageError("--no_ssh needs --hostfile (it names the nodes and their slots)")
    if opts.master_port is not None and not 0 < opts.master_port < 65536:
        raise UsageError(f"--master_port {opts.master_port}: not a port")


def recipe_arguments(opts: LaunchOptions, recipe_args: list[str], gpus: int) -> list[str]:
    recipe = RECIPES[opts.recipe]
    config = opts.config or (recipe.gpu_config if gpus else recipe.cpu_config)
    config = resolved(config) if Path(config).is_file() else config  # else a shipped name
    args = ["--config", config]
    if opts.model:
        args += ["--model_name_or_path", resolved(opts.model)]
    if opts.data:  # one file (a comma in its name included), or several comma-separated
        files = [opts.data] if Path(opts.data).is_file() else opts.data.split(",")
        args += ["--data_path", ",".join(resolved(p) for p in files if p)]
    if opts.out:
        args += ["--output_dir", resolved(opts.out)]
    return args + recipe_args


def kept_global_batch(opts: LaunchOptions, recipe_args: list[str], gpus: int) -> list[str]:
    """An elastic job's added recipe options: --global_batch_size, the run's global batch on
    the most nodes (per device x accumulation x data-parallel ranks), so that the job on fewer
    nodes (a restart after a lost node) accumulates more and trains on the same curve. Checked
    to split over every node count of the range. Nothing when the range is one count, when
    the recipe is given its own --global_batch_size, or when its config does not load (the
    recipe then reports why, once)."""
    from recipes.core.config import ConfigError, load_config

    fewest, most = node_range(opts)
    if fewest == most:
        return []
    argv = [*recipe_arguments(opts, recipe_args, gpus), "--strategy", opts.strategy]
    try:
        cfg, _ = load_config(argv, RECIPES[opts.recipe].config_class)
    except ConfigError:
        return []
    per_device, sp = cfg.per_device_train_batch_size, getattr(cfg, "sequence_parallel_size", 1)

    def dp(nodes: int) -> int:  # data-parallel ranks on that many nodes
        return max(1, opts.ngpu * nodes // sp)

    size = cfg.global_batch_size or per_device * cfg.gradient_accumulation_steps * dp(most)
    uneven = [n for n in range(fewest, most + 1) if size % (per_device * dp(n))]
    if uneven:
        raise UsageError(
            f"--nnodes {opts.nnodes}: the global batch {size} does not split over "
            f"{uneven[0]} node(s) ({dp(uneven[0])} data-parallel ranks x "
            f"{per_device} per device); choose a range, or a --global_batch_size, that "
            "every node count of the range divides"
        )
    return [] if cfg.global_batch_size else ["--global_batch_size", str(size)]


# The planner is within 15% of measured peaks (bench/memory_bench.py): refuse only beyond that.
CLEARLY_TOO_BIG = 1.15


def preflight(opts: LaunchOptions, recipe_args: list[str], gpu_bytes: int) -> str | None:
    """The memory planner (recipes/plan.py) on the run's resolved settings: a message naming
    what would fit when the chosen strategy clearly does not, else None."""
    from recipes.core.config import ConfigError, load_config
    from recipes.plan import GB, PlanError, plan

    if {"-h", "--help", "--print_config"} & {a.partition("=")[0] for a in recipe_args}:
        return None  # the recipe prints and exits; load_config here would print and exit too
    recipe = RECIPES[opts.recipe]
    argv = [*recipe_arguments(opts, recipe_args, 1), "--strategy", opts.strategy]
    try:
        cfg, _ = load_config(argv, recipe.config_class)
    except ConfigError:
        return None  # the recipe reports it, once, on rank 0
    if not cfg.model_name_or_path:
        return None
    from recipes.core import objectives

    rows_per_unit = objectives.get(recipe.objective).units.rows  # a DPO pair: 2 rows
    try:
        rows = plan(
            cfg.model_name_or_path,
            opts.ngpu,
            node_range(opts)[1],
            seq=cfg.model_max_length,
            batch=cfg.per_device_train_batch_size * rows_per_unit,
            bf16=cfg.bf16,
            checkpointing=cfg.gradient_checkpointing,
            gpu_memory=gpu_bytes,
            loss_chunk=cfg.loss_chunk_size,
            sp=cfg.sequence_parallel_size,  # each rank holds 1/sp of every row's activations
        )
    except PlanError as e:  # a model the planner cannot count: no pre-flight, say so
        print(f"note: no memory pre-flight ({e})", file=sys.stderr)
        return None
    chosen = next((r for r in rows if r.strategy == opts.strategy), None)
    if chosen is None or chosen.total <= CLEARLY_TOO_BIG * gpu_bytes:
        return None
    fitting = [r.strategy for r in rows if r.fits]
    instead = (
        f"strategies that fit: {', '.join(fitting)}"
        if fitting
        else "nothing fits: add GPUs or nodes, --gradient_checkpointing True, a shorter "
        "--model_max_length, --sequence_parallel_size, or QLoRA"
    )
    sp = cfg.sequence_parallel_size
    sp_flag = f" --sequence_parallel_size {sp}" if sp > 1 else ""
    return (
        f"{opts.strategy} needs ~{chosen.total / GB:,.1f} GB per GPU for this model, batch "
        f"and length, more than the {gpu_bytes / GB:,.1f} GB each GPU has ({instead}); see "
        f"python -m recipes.plan --model {cfg.model_name_or_path} --ngpu {opts.ngpu}{sp_flag}; "
        "--skip_preflight starts anyway"
    )


# ---------------------------------------------------------------------------- running a job


class Job:
    """The job's processes, and the signals that reach them: SIGTERM or the first Ctrl-C asks
    every rank to stop at its next step boundary (each saves a checkpoint); a second Ctrl-C
    interrupts them at once. The ranks are signalled directly, not through the launcher
    processes between (torchrun's agent would kill them 30 s later, DeepSpeed's launcher
    would be left orphaned)."""

    def __init__(self, script: str):
        self.script, self.signals = script, 0
        self.process = None  # the launcher subprocess (DeepSpeed), if any
        self.agent = None  # torchrun's elastic agent (it runs in this process), once started

    def ranks(self) -> list:
        import psutil

        found = []
        for child in psutil.Process().children(recursive=True):
            try:
                program = [a for a in child.cmdline()[1:] if not a.startswith("-")][:1]
            except psutil.Error:
                continue
            if program == [self.script]:  # python [-u] SCRIPT ...: a rank, not a launcher
                found.append(child)
        return found

    def no_more_restarts(self) -> None:
        """A stop asked for is no failure to recover from: with --max_restarts, torchrun's
        agent would restart the ranks that saved and exited 75, and they would resume and
        train on. Its remaining restarts (SimpleElasticAgent's own count) go to 0."""
        if self.agent is not None:
            self.agent._remaining_restarts = 0

    def on_signal(self, signum, _frame) -> None:
        self.signals += 1
        self.no_more_restarts()
        forward = signal.SIGTERM if self.signals == 1 else signal.SIGINT
        if self.signals == 1:
            print(
                "stopping: every rank saves a checkpoint at its next step boundary (Ctrl-C "
                "again stops at once)",
                file=sys.stderr,
                flush=True,
            )
        for rank in self.ranks():
            try:
                rank.send_signal(forward)
            except Exception:  # gone already
                pass

    def run(self, command: list[str], env: dict, torch_strategy: bool) -> int:
        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if torch_strategy:  # [python, -m, torch.distributed.run, torchrun's arguments...]
                return self._torchrun(command[3:], env)
            import subprocess

            # a session of its own: the terminal's Ctrl-C reaches this process, which
            # forwards it to the ranks, never the DeepSpeed launcher (it would kill them)
            self.process = subprocess.Popen(command, env=env, start_new_session=True)
            while True:
                try:
                    return self.process.wait()
                except InterruptedError:
                    continue
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _torchrun(self, torchrun_args: list[str], env: dict) -> int:
        """torchrun's agent in a thread of this process (not the main thread, so it installs no
        signal handlers: this process forwards signals itself), so that a failed rank ends the
        launch with its exit status and one line, not the agent's ChildFailedError traceback:
        the rank has already said why (bad input: 2; a non-finite step: 3; stopped: 75)."""
        import logging

        from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run

        original = SimpleElasticAgent.run

        def run_agent(agent, *args, **kwargs):  # the agent torchrun makes, kept for signals
            self.agent = agent
            if self.signals:
                self.no_more_restarts()
            return original(agent, *args, **kwargs)

        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        os.environ.update(env)
        outcome = {}

        def agent():
            try:
                run(parse_args(torchrun_args))
                outcome["code"] = 0
            except ChildFailedError as e:
                outcome["failure"] = e.get_first_failure()
            except BaseException as e:  # noqa: BLE001 - reported below, in the main thread
                outcome["error"] = e

        thread = threading.Thread(target=agent, name="torchrun-agent")
        SimpleElasticAgent.run = run_agent
        try:
            thread.start()
            while thread.is_alive():
                thread.join(0.2)
        finally:
            SimpleElasticAgent.run = original
        if "error" in outcome:
            raise outcome["error"]
        if "failure" not in outcome:
            return 0
        rank, failure = outcome["failure"]
        code = failure.exitcode
        if code < 0:
            print(f"error: rank {rank} was killed by {signal.Signals(-code).name}", file=sys.stderr)
            return 128 - code
        if code not in (2, 3, STOPPED, 130):  # the recipe printed its own message for those
            print(
                f"error: rank {rank} failed with exit status {code} (its output is above)",
                file=sys.stderr,
            )
        return code


def job_env(ngpu: int) -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(ngpu, 1))))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not any(os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")):
        import torch

        if not torch.cuda.is_available():  # DeepSpeed would warn in every process that it is
            env["DS_ACCELERATOR"] = "cpu"  # falling back to the CPU
    return env


@entry_point
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    opts = parse(LaunchOptions, own, prog="python -m launch.train", description=__doc__)

    import torch

    gpus = torch.cuda.device_count()
    check(opts, gpus)
    if {"-h", "--help", "--print_config"} & {a.partition("=")[0] for a in recipe_args}:
        import subprocess  # the recipe prints and exits: once, from one process

        script = [sys.executable, str(RECIPES[opts.recipe].path), "--strategy", opts.strategy]
        return subprocess.call([*script, *recipe_arguments(opts, recipe_args, gpus)])
    if gpus and not opts.skip_preflight:
        refusal = preflight(opts, recipe_args, torch.cuda.get_device_properties(0).total_memory)
        if refusal:
            raise UsageError(refusal)
    recipe_args = [*recipe_args, *kept_global_batch(opts, recipe_args, gpus)]
    command = job_command(opts, recipe_args=recipe_arguments(opts, recipe_args, gpus))
    where = "" if gpus else f"no GPU: {opts.ngpu} CPU process(es) on gloo\n"
    print(where + shlex.join(command), flush=True)
    if opts.dry_run:
        return 0
    return launch(command, opts.strategy, opts.ngpu, script=str(RECIPES[opts.recipe].path))


def launch(command: list[str], strategy: str, ngpu: int, *, script: str) -> int:
    """Run a job_command() to its end: signals forwarded to the ranks (running `script`), one
    line for a failed rank, its exit status returned."""
    torch_launcher = parallel.get(strategy).launcher == "torchrun"
    return Job(script).run(command, job_env(ngpu), torch_launcher)


if __name__ == "__main__":
    sys.exit(main())
