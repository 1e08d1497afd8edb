"""`make bench` (data part): template + tokenize + mask, against FastChat and the floor.

For each file: conversations/s of camelid's ConversationTokenizer, of FastChat's `preprocess`
(same legacy Llama tokenizer), and of the floor: plain batch tokenization of the same rendered
text. Same process, same tokenizer, best of N timed repeats after a warm-up. Also the share of
real tokens per batch when padding to 2,048 (FastChat) vs per micro-batch (camelid).

    python -m bench.data_bench [--quick] [--out bench/results/data_bench.json]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
from transformers import AutoTokenizer

from bench import REPO, result_option, write_json
from bench.fastchat_ref import fastchat_accepts, fastchat_preprocess
from fastchat_data.build import read_trainable
from fastchat_data.options import entry_point, option, parse
from fastchat_data.report import Report
from fastchat_data.tiny import reference_corpus, shared_data_dir, tiny_model
from fastchat_data.tokenize import ConversationTokenizer

FILES = ["fastchat_dummy_conversation.json", "sharegpt_v3_sample_1000.json", "alpaca_data.json"]
MAX_LENGTH = 2048
BATCH = 1000


@dataclass
class DataBenchOptions:
    quick: bool = option(False, "2,000 conversations per file, one repeat")
    out: str = result_option("data_bench.json")


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def real_token_share(lengths: np.ndarray, batch: int, grouped: bool, *, seed: int = 0) -> float:
    """Real tokens / padded tokens over micro-batches of `batch` rows padded to their longest."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    if grouped:  # length grouping within megabatches, as the training data module does
        mega = batch * 50
        order = np.concatenate(
            [c[np.argsort(-lengths[c])] for c in np.split(order, range(mega, len(order), mega))]
        )
    padded = sum(
        lengths[order[i : i + batch]].max() * len(order[i : i + batch])
        for i in range(0, len(order), batch)
    )
    return float(lengths.sum() / padded)


def bench_file(name: str, tokenizer, quick: bool) -> dict:
    convs = list(read_trainable([str(shared_data_dir() / name)], Report("bench")))
    if quick:
        convs = convs[:2000]
    repeats = 1 if quick else 3
    ct = ConversationTokenizer(tokenizer, "vicuna_v1.1", max_length=MAX_LENGTH)
    texts = [ct.render_text(c) for c in convs]

    def camelid():
        for i in range(0, len(convs), BATCH):
            ct.encode_batch(convs[i : i + BATCH])

    def floor():
        for i in range(0, len(texts), BATCH):
            tokenizer(texts[i : i + BATCH], truncation=True, max_length=MAX_LENGTH)["input_ids"]

    t_camelid, t_floor = best_time(camelid, repeats), best_time(floor, repeats)
    fc_convs = [c for c in convs if fastchat_accepts(c)]
    fc_subset = fc_convs[: 500 if quick else 5000]  # FastChat pads every sample to 2,048: slow
    t_fastchat = best_time(lambda: fastchat_preprocess(fc_subset, tokenizer, MAX_LENGTH), 1)
    _, _, kept = fastchat_preprocess(fc_subset, tokenizer, MAX_LENGTH)
    # a sample FastChat masks away although it has a reply within MAX_LENGTH: a "mismatch"
    mismatched = sum(
        not k and hasattr(e, "input_ids") for k, e in zip(kept, ct.encode_batch(fc_subset))
    )
    lengths = np.array(
        [
            min(len(e.input_ids), MAX_LENGTH)
            for e in ct.encode_batch(convs)
            if hasattr(e, "input_ids")
        ]
    )
    return {
        "file": name,
        "conversations": len(convs),
        "camelid_conv_per_s": len(convs) / t_camelid,
        "floor_conv_per_s": len(convs) / t_floor,
        "camelid_over_floor_time": t_camelid / t_floor,
        "fastchat_conversations_timed": len(fc_subset),
        "fastchat_conv_per_s": len(fc_subset) / t_fastchat,
        "speedup_vs_fastchat": (len(convs) / t_camelid) / (len(fc_subset) / t_fastchat),
        "fastchat_masked_away": mismatched,
        "real_tokens_pad_to_2048": float(lengths.mean() / MAX_LENGTH),
        "real_tokens_dynamic_padding_b8": real_token_share(lengths, 8, grouped=False),
        "real_tokens_length_grouped_b8": real_token_share(lengths, 8, grouped=True),
    }


@entry_point
def main(argv: list[str] | None = None) -> int:
    opts = parse(DataBenchOptions, argv, prog="python -m bench.data_bench", description=__doc__)
    model = tiny_model(
        "llama", "tiny", texts=reference_corpus(), vocab_size=4000, cache_dir=REPO / ".cache"
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [bench_file(name, tokenizer, opts.quick) for name in FILES]
    head = (
        f"{'file':34} {'convs':>7} {'camelid/s':>10} {'floor/s':>10} {'vs floor':>9} "
        f"{'FastChat/s':>11} {'speed-up':>9} {'FC masked':>9} {'real@2048':>9} {'real dyn':>9} "
        f"{'real grp':>9}"
    )
    print(
        "\ndata pipeline: template + tokenize + mask "
        "(legacy Llama tokenizer, vicuna_v1.1, max 2,048)"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['file']:34} {r['conversations']:>7,} {r['camelid_conv_per_s']:>10,.0f} "
            f"{r['floor_conv_per_s']:>10,.0f} {r['camelid_over_floor_time']:>8.2f}x "
            f"{r['fastchat_conv_per_s']:>11,.0f} {r['speedup_vs_fastchat']:>8.1f}x "
            f"{r['fastchat_masked_away']:>9} {r['real_tokens_pad_to_2048']:>9.1%} "
            f"{r['real_tokens_dynamic_padding_b8']:>9.1%} "
            f"{r['real_tokens_length_grouped_b8']:>9.1%}"
        )
    print(
        "vs floor: camelid's time / plain batch tokenization of the same rendered text "
        "(target <= 1.5x); FastChat timed on its first 'FastChat conversations timed' (JSON); "
        "real@2048: real-token share when padding to 2,048 as FastChat does; dyn / grp: per "
        "micro-batch of 8, random / length-grouped."
    )
    write_json(opts.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
