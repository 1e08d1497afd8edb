"""ROUGE-1/2/L and BLEU-4 of generated answers against references, through the field's
libraries: sacrebleu (corpus BLEU) and Google's rouge-score (mean F1 over the samples).

Chinese needs a choice of tokenizer in both, made here once per corpus: when most of the
references' tokens are Han characters, BLEU uses sacrebleu's `zh` tokenizer (each Han character a
token, the rest as `13a`) and ROUGE a tokenizer that does the same on top of rouge-score's own
(whose default keeps only [a-z0-9] and would score Chinese as empty). Otherwise both run with
their defaults (`13a`; rouge-score's default tokenizer, no stemming), so the numbers are the ones
the libraries report for English. `text_scores` names the BLEU tokenizer it used
(`bleu_tokenize`) so that scores are read against the right one.
"""

from __future__ import annotations

import re
import unicodedata

# Han ideographs (about the ranges sacrebleu's zh tokenizer splits into characters, less punctuation
# and symbols, which ROUGE drops)
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002f800-\U0002fa1f"
_HAN_CHAR = re.compile(f"[{_HAN}]")
_UNIT = re.compile(f"[{_HAN}]|[^\\W_]+")  # a Han character or a run of other letters / digits
ZH_SHARE = 0.5  # a corpus whose references are at least half Han characters is scored as Chinese


def han_share(texts: list[str]) -> float:
    """Share of Han characters among the tokens (Han characters, other words) of `texts`."""
    units = [u for t in texts for u in _UNIT.findall(t)]
    return sum(bool(_HAN_CHAR.match(u)) for u in units) / len(units) if units else 0.0


class ChineseRougeTokenizer:
    """rouge-score's default tokenization (lower-cased [a-z0-9] words, no stemming) with every Han
    character a token of its own; full-width forms are folded to ASCII first (NFKC)."""

    def tokenize(self, text: str) -> list[str]:
        from rouge_score import tokenize

        text, out, pos = unicodedata.normalize("NFKC", text), [], 0
        for m in _HAN_CHAR.finditer(text):
            out += tokenize.tokenize(text[pos : m.start()], None)
            out.append(m.group())
            pos = m.end()
        return out + tokenize.tokenize(text[pos:], None)


def text_scores(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F1 (0-100), corpus BLEU-4 (0-100) and the BLEU tokenizer used."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    chinese = han_share(references) >= ZH_SHARE
    tokenize = "zh" if chinese else "13a"
    if not references:  # nothing generated: nothing matched
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "bleu": 0.0, "bleu_tokenize": tokenize}
    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score
    scorer = rouge_scorer.RougeScorer(
        ["rouge1", "rouge2", "rougeL"], tokenizer=ChineseRougeTokenizer() if chinese else None
    )
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    rouge = {
        k: 100 * sum(s[k].fmeasure for s in scores) / len(scores)
        for k in ("rouge1", "rouge2", "rougeL")
    }
    return {**rouge, "bleu": bleu, "bleu_tokenize": tokenize}
