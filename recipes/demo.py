"""`make demo`: the whole pipeline on embedded data, on CPU, nothing downloaded.

1-5. the data tools on generated identity conversations (fastchat_data.demo): the data, a
     tiny Llama with its own tokenizer, stats, the training set, one conversation inspected;
6.   a Vicuna-style full fine-tune of that tiny Llama on that data, 2 processes, FSDP on gloo
     (what `make train-vicuna` runs);
7.   one chat reply from the exported Hugging Face folder, loaded by plain transformers.

`--assets_only` builds only the data and the model and prints their two paths on one line
(model, then data): what `make train-vicuna` trains on when no MODEL is given.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fastchat_data.options import entry_point, option, parse
from recipes.core.quiet import quiet, verbose_option, verbose_requested


@dataclass
class DemoOptions:
    out: str = option("runs/demo", "the demo's folder (a rerun resumes or refreshes it)")
    max_steps: int = option(60, "training steps of step 6", minimum=1)
    assets_only: bool = option(
        False, "build only the tiny model and the identity data, print their paths, and stop"
    )
    verbose: bool = verbose_option()


def args(text: str, **paths) -> list[str]:
    """A command line from a string of fixed options and the run's paths."""
    return [*text.split(), *(x for k, v in paths.items() for x in (f"--{k}", str(v)))]


Options = TypeVar("Options")
REPO = Path(__file__).resolve().parents[1]


def out_option(name: str):
    """--out of a walk-through on the shared data: its folder, runs/NAME in the repository."""
    return option(str(REPO / "runs" / name), "the demo's folder")


def data_dir_option(files: str):
    """--data_dir of a walk-through: the shared data folder, naming the `files` it reads."""
    return option(None, f"the shared data folder ({files}); none: ../shared/data")


def start(options: type[Options], argv: list[str] | None, prog: str, *, doc: str):
    """What every walk-through does first: quieten third-party warnings (unless --verbose),
    read its options (`options` has an `out` folder), make OUT/data. Returns (options, OUT)."""
    quiet(verbose_requested(argv))
    opts = parse(options, argv, prog=prog, description=doc)
    out = Path(opts.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    return opts, out


class Step:
    """One walk-through step: a command's `main` run on `args(fixed, **paths)`, under a title."""

    def __init__(self, title: str, main: Callable[[list[str]], int], fixed: str, **paths):
        self.title, self.main, self.fixed, self.paths = title, main, fixed, paths


def run_steps(*steps: Step) -> int:
    """Run `steps` in order, each after its title; the first that fails ends the walk-through
    with its exit code (what each demo did after every command). 0 when all succeed."""
    for step in steps:
        print(step.title, flush=True)
        code = step.main(args(step.fixed, **step.paths))
        if code:
            return code
    return 0


def assets(out: Path, quiet: bool = False) -> tuple[Path, Path]:
    """The identity conversations and the tiny Llama trained on their text: (model, data)."""
    from fastchat_data import demo as data_demo

    return data_demo.model_and_data(out, quiet=quiet)


@entry_point
def main(argv: list[str] | None = None) -> int:
    quiet(verbose_requested(argv))
    opts = parse(DemoOptions, argv, prog="python -m recipes.demo", description=__doc__)
    out = Path(opts.out)
    if opts.assets_only:
        model, data = assets(out, quiet=True)
        print(model, data)
        return 0
    from fastchat_data import demo as data_demo
    from launch import train as launcher

    model, data = data_demo.run(out)
    print("\n== 6. train: make train-vicuna NGPU=2 STRATEGY=fsdp (the tiny Llama, identity data)")
    run = out / "vicuna"
    code = launcher.main(
        [
            "--ngpu",
            "2",
            "--strategy",
            "fsdp",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(run),
            "--",
            "--max_steps",
            str(opts.max_steps),
            "--overwrite_output_dir",
            "True",
            "--logging_steps",
            "10",
        ]
    )
    if code:
        return code
    print("\n== 7. chat with the export (plain transformers: no camelid import to load it)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.core.generate import reply

    exported = AutoModelForCausalLM.from_pretrained(run / "model")
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    question = "Who are you?"
    print(f"USER: {question}\nASSISTANT: {reply(exported, tokenizer, [], question=question)}")
    print(f"\ndemo done: {run / 'model'} (try python -m recipes.chat --model {run / 'model'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
