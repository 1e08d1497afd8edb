"""The data half of `make demo`: the data pipeline end to end on embedded data, nothing
downloaded.

Generates identity conversations, trains a tiny Llama-style tokenizer on them (and builds a
tiny Llama with it), shows their statistics, builds the training set (twice: the second time
from the cache) and shows what the loss is taken on. `recipes.demo` then trains that model on
that data.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .commands import inspect, stats
from .identity import identity_conversations
from .io import write_records
from .options import entry_point, option, parse
from .tiny import TEMPLATE_WORDS, corpus_texts, tiny_model


@dataclass
class DataDemoOptions:
    out: str = option("runs/demo", "where the demo writes its files")
    name: str = option("Camelid", "the assistant's name in the identity data")


def model_and_data(out: Path, name: str = "Camelid", quiet: bool = False) -> tuple[Path, Path]:
    """The identity conversations (out/identity.json) and a tiny Llama whose tokenizer was
    trained on their text (built once, cached under out/cache): (model folder, data file)."""
    records = identity_conversations(name, n=300)
    data = Path(out) / "identity.json"
    write_records(data, records)
    if not quiet:
        print(f"wrote {len(records)} conversations to {data}")
        print("\n== 2. a tiny Llama (SentencePiece tokenizer, legacy=True) built locally")
    t0 = time.time()
    texts = corpus_texts(records) + TEMPLATE_WORDS * 20
    model = tiny_model("llama", "tiny", texts=texts, cache_dir=Path(out) / "cache")
    if not quiet:
        print(f"{model} ({time.time() - t0:.1f}s)")
    return model, data


def run(out: Path, name: str = "Camelid") -> tuple[Path, Path]:
    """Steps 1-5; returns (model folder, data file) for the training step."""
    print("== 1. data: identity conversations, generated (FastChat's hardcoded questions)")
    model, data = model_and_data(out, name)
    cache = out / "cache"

    print("\n== 3. stats")
    stats(str(data), tokenizer=str(model))

    print("\n== 4. build the training set (Vicuna v1.1 template, assistant-only loss)")
    from .build import build_dataset

    for attempt in ("first build", "second build (cache)"):
        t0 = time.time()
        ds, _ = build_dataset(
            str(data),
            str(model),
            "vicuna_v1.1",
            max_length=512,
            out=str(out / "train"),
            cache_dir=str(cache),
            quiet=attempt != "first build",
        )
        print(f"{attempt}: {len(ds)} rows in {time.time() - t0:.2f}s")

    print("\n== 5. one conversation as the model sees it: trained tokens are marked")
    inspect(str(data), str(model), template="vicuna_v1.1", index=1)
    print(
        f"\ntraining set: {out / 'train'} (datasets.load_from_disk; columns "
        f"{', '.join(ds.column_names)})"
    )
    return model, data


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(DataDemoOptions, argv, prog="python -m fastchat_data.demo", description=__doc__)
    run(Path(opts.out), opts.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
