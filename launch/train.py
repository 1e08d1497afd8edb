"""Launch a recipe (the full fine-tune, or DPO with --recipe dpo): torchrun for
single/DDP/FSDP, the deepspeed launcher for ZeRO.

    python -m launch.train --ngpu 4 --strategy fsdp [--recipe sft|dpo] [--model M] [--data D] [--config C] [--out O] [-- recipe args]

Without GPUs the same command starts NGPU CPU processes on gloo, through the same code path.
Multi-node: --nnodes/--node_rank/--master_addr (torchrun rendezvous) or --hostfile (deepspeed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from recipes.core.config import STRATEGIES, HelpFormatter

REPO = Path(__file__).resolve().parents[1]
# recipe -> (script, its YAML on GPUs, its YAML on CPU)
RECIPES = {
    "sft": ("full_finetune.py", "vicuna_7b.yaml", "tiny_cpu.yaml"),
    "dpo": ("dpo.py", "dpo_7b.yaml", "dpo_tiny_cpu.yaml"),
}


def build_command(args, gpus: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    script = REPO / "recipes" / RECIPES[args.recipe][0]
    recipe = [str(script), "--config", args.config, "--strategy", args.strategy]
    for flag, value in (
        ("--model_name_or_path", args.model),
        ("--data_path", args.data),
        ("--output_dir", args.out),
    ):
        if value:
            recipe += [flag, value]
    recipe += args.recipe_args
    if args.strategy.startswith("zero"):
        launcher = [str(bin_dir / "deepspeed") if (bin_dir / "deepspeed").exists() else "deepspeed"]
        if args.hostfile:
            launcher += ["--hostfile", args.hostfile, "--master_addr", args.master_addr,
                         "--master_port", str(args.master_port)]  # fmt: skip
            if args.no_ssh:  # this node only: run the same command on every node
                launcher += ["--no_ssh", "--node_rank", str(args.node_rank)]
        else:
            launcher += ["--num_gpus", str(args.ngpu), "--master_port", str(args.master_port)]
        return launcher + recipe
    torchrun = [str(bin_dir / "torchrun") if (bin_dir / "torchrun").exists() else "torchrun"]
    if args.nnodes > 1:
        torchrun += ["--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank), "--rdzv_backend", "c10d",
                     "--rdzv_endpoint", f"{args.master_addr}:{args.master_port}", "--rdzv_id", args.rdzv_id]  # fmt: skip
    else:
        torchrun += ["--standalone"]
    return torchrun + ["--nproc_per_node", str(args.ngpu)] + recipe


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__,
                                 formatter_class=HelpFormatter, allow_abbrev=False)  # fmt: skip
    ap.add_argument(
        "--ngpu",
        type=int,
        default=1,
        help="processes per node (GPUs, or CPU processes without GPUs)",
    )
    ap.add_argument("--strategy", default="fsdp", choices=STRATEGIES, metavar="STRATEGY",
                    help=f"how processes share the model: {', '.join(STRATEGIES)}")  # fmt: skip
    ap.add_argument("--recipe", default="sft", choices=list(RECIPES),
                    help="sft: the Vicuna full fine-tune; dpo: preference tuning (recipes/dpo.py)")  # fmt: skip
    ap.add_argument(
        "--config",
        default=None,
        help="a YAML recipe (default: vicuna_7b.yaml / dpo_7b.yaml on GPU, "
        "tiny_cpu.yaml / dpo_tiny_cpu.yaml on CPU)",
    )
    ap.add_argument("--model", default=None,
                    help="base model folder: the recipe's --model_name_or_path (default: the tiny model)")  # fmt: skip
    ap.add_argument("--data", default=None,
                    help="ShareGPT/Alpaca/messages file(s), comma-separated: the recipe's --data_path "
                    "(default: embedded identity data)")  # fmt: skip
    ap.add_argument("--out", default=None,
                    help="the run's folder: the recipe's --output_dir (default: the --config's)")  # fmt: skip
    ap.add_argument("--nnodes", type=int, default=1, help="nodes (torchrun rendezvous)")
    ap.add_argument("--node_rank", type=int, default=0, help="this node's rank among --nnodes")
    ap.add_argument("--master_addr", default="127.0.0.1", help="address of node 0")
    ap.add_argument("--master_port", type=int, default=29500, help="port on node 0")
    ap.add_argument("--rdzv_id", default="camelid", help="torchrun rendezvous id, on all nodes")
    ap.add_argument("--hostfile", default=None, help="deepspeed hostfile for multi-node ZeRO")
    ap.add_argument("--no_ssh", action="store_true",
                    help="ZeRO multi-node without ssh/pdsh: start this node's processes only "
                         "(run on every node with its --node_rank; needs --hostfile)")  # fmt: skip
    ap.add_argument("--dry_run", action="store_true", help="print the command only")
    ap.add_argument("--skip_preflight", action="store_true",
                    help="on GPUs, start even if the memory planner says the strategy does not fit")  # fmt: skip
    args = ap.parse_args(argv)
    args.recipe_args = recipe_args

    import torch

    gpus = torch.cuda.device_count()
    if gpus and args.ngpu > gpus:
        print(f"error: NGPU={args.ngpu} but this node has {gpus} GPUs", file=sys.stderr)
        return 2
    if not gpus and args.ngpu > (os.cpu_count() or 1) * 4:
        print(
            f"error: NGPU={args.ngpu} CPU processes on {os.cpu_count()} cores is more than this machine can run",
            file=sys.stderr,
        )
        return 2
    if args.strategy == "single" and args.ngpu != 1:
        print(
            "error: STRATEGY=single runs one process; use NGPU=1 or another strategy",
            file=sys.stderr,
        )
        return 2
    if args.no_ssh and not args.hostfile:
        print(
            "error: --no_ssh needs --hostfile (it names the nodes and their slots)", file=sys.stderr
        )
        return 2
    if args.config is None:
        args.config = RECIPES[args.recipe][1 if gpus else 2]
    if gpus and not args.skip_preflight:
        refusal = preflight(args, torch.cuda.get_device_properties(0).total_memory)
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
    cmd = build_command(args, gpus)
    print(
        ("" if gpus else f"no GPU: {args.ngpu} CPU process(es) on gloo\n") + shlex.join(cmd),
        flush=True,
    )
    if args.dry_run:
        return 0
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(args.ngpu, 1))))
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        print(f"error: {cmd[0]} not found", file=sys.stderr)
        return 2
    if not args.strategy.startswith("zero"):
        os.environ.update(env)
        os.chdir(REPO)
        return run_torchrun(cmd[1:])
    # the recipe's own last line names the exported folder
    return subprocess.call(cmd, env=env, cwd=REPO)


# The planner is within 15% of measured peaks (bench/memory_bench.py): refuse only beyond that.
CLEARLY_TOO_BIG = 1.15


def preflight(args, gpu_bytes: int) -> str | None:
    """The memory planner (recipes/plan.py) on the run's resolved settings: a message naming
    what would fit when the chosen strategy clearly does not, else None."""
    from recipes.core.config import ConfigError, load_config
    from recipes.plan import GB, plan

    if {"-h", "--help", "--print_config"} & {a.partition("=")[0] for a in args.recipe_args}:
        return None  # the recipe prints and exits; load_config here would print and exit too
    argv = ["--config", args.config, "--strategy", args.strategy, *args.recipe_args]
    argv += ["--model_name_or_path", args.model] if args.model else []
    argv += ["--data_path", args.data] if args.data else []  # DPO requires it
    if args.recipe == "dpo":
        from recipes.dpo import DPOConfig as config_cls
    else:
        from recipes.core.config import TrainConfig as config_cls
    try:
        cfg, _ = load_config(argv, cls=config_cls)
    except ConfigError:
        return None  # the recipe reports it, once, on rank 0
    if not cfg.model_name_or_path:
        return None  # the tiny default model
    rows = plan(cfg.model_name_or_path, args.ngpu, args.nnodes, seq=cfg.model_max_length,
                batch=cfg.per_device_train_batch_size * (2 if args.recipe == "dpo" else 1), bf16=cfg.bf16,
                checkpointing=cfg.gradient_checkpointing, gpu_memory=gpu_bytes,
                loss_chunk=cfg.loss_chunk_size)  # fmt: skip
    chosen = next((r for r in rows if r.strategy == args.strategy), None)
    if chosen is None or chosen.total <= CLEARLY_TOO_BIG * gpu_bytes:
        return None
    fitting = [r.strategy for r in rows if r.fits]
    instead = (f"strategies that fit: {', '.join(fitting)}" if fitting else
               "nothing fits: add GPUs or nodes, --gradient_checkpointing True, a shorter "
               "--model_max_length, or QLoRA")  # fmt: skip
    return (f"{args.strategy} needs ~{chosen.total / GB:,.1f} GB per GPU for this model, batch and "
            f"length, more than the {gpu_bytes / GB:,.1f} GB each GPU has ({instead}); see "
            f"python -m recipes.plan --model {cfg.model_name_or_path} --ngpu {args.ngpu}; "
            f"--skip_preflight starts anyway")  # fmt: skip


def run_torchrun(torchrun_args: list[str]) -> int:
    """torchrun inside this process, so that a failed worker ends the launch with its exit
    status and one line, not the elastic agent's ChildFailedError traceback: the worker has
    already said why (bad config or data: status 2; a non-finite step: status 3)."""
    import logging
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0:
            print(f"error: rank {rank} was killed by {signal.Signals(-code).name}", file=sys.stderr)
            return 128 - code
        if code not in (2, 3):  # the recipe printed its own message for those
            print(f"error: rank {rank} failed with exit status {code} (its output is above)",
                  file=sys.stderr)  # fmt: skip
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
