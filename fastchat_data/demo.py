"""`make demo`: the data pipeline end to end on embedded data, nothing downloaded.

Generates identity conversations, trains a tiny Llama-style tokenizer on them, builds the
training set (twice: the second time from the cache) and shows what the loss is taken on.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .commands import inspect, stats
from .identity import identity_conversations
from .io import write_records
from .tiny import TEMPLATE_WORDS, corpus_texts, tiny_model


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="runs/demo", help="where the demo writes its files")
    ap.add_argument("--name", default="Camelid", help="the assistant's name in the identity data")
    args = ap.parse_args(argv)
    out = Path(args.out)
    cache = out / "cache"

    print(
        "== 1. data: identity conversations, generated (FastChat's hardcoded questions, camelid's way)"
    )
    records = identity_conversations(args.name, n=300)
    data = out / "identity.json"
    write_records(data, records)
    print(f"wrote {len(records)} conversations to {data}")

    print("\n== 2. a tiny Llama (SentencePiece tokenizer, legacy=True) built locally")
    t0 = time.time()
    model = tiny_model(
        "llama", "tiny", texts=corpus_texts(records) + TEMPLATE_WORDS * 20, cache_dir=cache
    )
    print(f"{model} ({time.time() - t0:.1f}s)")

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
            512,
            out=str(out / "train"),
            cache_dir=str(cache),
            quiet=attempt != "first build",
        )
        print(f"{attempt}: {len(ds)} rows in {time.time() - t0:.2f}s")

    print("\n== 5. one conversation as the model sees it: trained tokens are marked")
    inspect(str(data), str(model), template="vicuna_v1.1", index=1)
    print(
        f"\ntraining set: {out / 'train'} (datasets.load_from_disk; columns {', '.join(ds.column_names)})"
    )
    return out / "train"


if __name__ == "__main__":
    main()
