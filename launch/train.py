"""Launch the full fine-tune: torchrun for single/DDP/FSDP, the deepspeed launcher for ZeRO.

    python -m launch.train --ngpu 4 --strategy fsdp [--model M] [--data D] [--config C] [--out O] [-- recipe args]

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

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "full_finetune.py"
STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload")


def build_command(args, gpus: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    recipe = [str(RECIPE), "--config", args.config, "--strategy", args.strategy]
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
            launcher += [
                "--hostfile",
                args.hostfile,
                "--master_addr",
                args.master_addr,
                "--master_port",
                str(args.master_port),
            ]
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
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--ngpu",
        type=int,
        default=1,
        help="processes per node (GPUs, or CPU processes without GPUs)",
    )
    ap.add_argument("--strategy", default="fsdp", choices=STRATEGIES)
    ap.add_argument(
        "--config",
        default=None,
        help="a YAML recipe (default: vicuna_7b.yaml on GPU, tiny_cpu.yaml on CPU)",
    )
    ap.add_argument("--model", default=None, help="base model folder (default: the tiny model)")
    ap.add_argument(
        "--data",
        default=None,
        help="ShareGPT/Alpaca/messages file (default: embedded identity data)",
    )
    ap.add_argument("--out", default=None, help="output directory")
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--node_rank", type=int, default=0)
    ap.add_argument("--master_addr", default="127.0.0.1")
    ap.add_argument("--master_port", type=int, default=29500)
    ap.add_argument("--rdzv_id", default="camelid")
    ap.add_argument("--hostfile", default=None, help="deepspeed hostfile for multi-node ZeRO")
    ap.add_argument("--dry_run", action="store_true", help="print the command only")
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
    if args.config is None:
        args.config = "vicuna_7b.yaml" if gpus else "tiny_cpu.yaml"
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
    rc = subprocess.call(cmd, env=env, cwd=REPO)
    exported = Path(args.out or "runs/vicuna")
    exported = (exported if exported.is_absolute() else REPO / exported) / "model"
    if rc == 0 and (exported / "config.json").exists():
        print(f"exported model: {exported}")  # the run's last line names the Hugging Face folder
    return rc


if __name__ == "__main__":
    sys.exit(main())
