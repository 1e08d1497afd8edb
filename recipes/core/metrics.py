"""ROUGE-1/2/L and BLEU-4 for generated answers against references (the course's metrics).

Written here rather than taken from rouge-score / sacrebleu: neither handles Chinese without
extra set-up, and the definitions are short. Text is split into words for alphabetic scripts
and into single characters for CJK, lower-cased, punctuation dropped. ROUGE is the F1 of
clipped n-gram overlap (ROUGE-L: of the longest common subsequence), averaged over samples;
BLEU is corpus BLEU-4 (clipped n-gram precisions over the whole set, geometric mean, brevity
penalty), as sacrebleu reports it, on this tokenization, scaled to 0-100.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\u3040-\u30ff\uac00-\ud7af]|[^\W_]+", re.UNICODE)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def ngrams(seq: list[str], n: int) -> Counter:
    return Counter(tuple(seq[i : i + n]) for i in range(len(seq) - n + 1))


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_n(pred: list[str], ref: list[str], n: int) -> float:
    p, r = ngrams(pred, n), ngrams(ref, n)
    return _f1(sum((p & r).values()), sum(p.values()), sum(r.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: list[str], ref: list[str]) -> float:
    return _f1(lcs_length(pred, ref), len(pred), len(ref))


def corpus_bleu(preds: list[list[str]], refs: list[list[str]], max_n: int = 4) -> float:
    matches, totals = [0] * max_n, [0] * max_n
    pred_len = sum(len(p) for p in preds)
    ref_len = sum(len(r) for r in refs)
    for p, r in zip(preds, refs):
        for n in range(1, max_n + 1):
            pn, rn = ngrams(p, n), ngrams(r, n)
            matches[n - 1] += sum((pn & rn).values())
            totals[n - 1] += sum(pn.values())
    if pred_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return 100 * brevity * math.exp(log_precision)


def text_scores(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F1 (0-100) and corpus BLEU-4 (0-100)."""
    preds, refs = [tokens(p) for p in predictions], [tokens(r) for r in references]
    n = max(len(preds), 1)
    return {
        "rouge1": 100 * sum(rouge_n(p, r, 1) for p, r in zip(preds, refs)) / n,
        "rouge2": 100 * sum(rouge_n(p, r, 2) for p, r in zip(preds, refs)) / n,
        "rougeL": 100 * sum(rouge_l(p, r) for p, r in zip(preds, refs)) / n,
        "bleu": corpus_bleu(preds, refs),
    }
