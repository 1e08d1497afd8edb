"""recipes.core.metrics: the libraries' ROUGE and BLEU, with the tokenizer chosen per corpus."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from recipes.core.metrics import ChineseRougeTokenizer, han_share, text_scores

ENGLISH_PRED = ["The cat sat on the mat.", "It is raining today, isn't it?", "Paris is in France"]
ENGLISH_REF = ["The cat is on the mat.", "Today it rains.", "Paris is the capital of France."]
KEYS = ("rouge1", "rouge2", "rougeL")


def test_english_agrees_with_sacrebleu_and_rouge_score():
    got = text_scores(ENGLISH_PRED, ENGLISH_REF)
    bleu = sacrebleu.corpus_bleu(ENGLISH_PRED, [ENGLISH_REF], tokenize="13a").score
    scorer = rouge_scorer.RougeScorer(list(KEYS))
    rows = [scorer.score(r, p) for p, r in zip(ENGLISH_PRED, ENGLISH_REF)]
    want = {k: 100 * sum(s[k].fmeasure for s in rows) / len(rows) for k in KEYS}
    assert got["bleu_tokenize"] == "13a"
    assert got["bleu"] == bleu and 0 < bleu < 100
    assert {k: got[k] for k in KEYS} == want
    assert 0 < want["rouge2"] < want["rouge1"] < 100


def test_chinese_is_scored_per_character():
    pred, ref = ["一只猫坐在垫子上。"], ["猫坐在地毯上。"]
    got = text_scores(pred, ref)
    assert got["bleu_tokenize"] == "zh"
    assert got["bleu"] == sacrebleu.corpus_bleu(pred, [ref], tokenize="zh").score
    # tokens 一 只 猫 坐 在 垫 子 上 against 猫 坐 在 地 毯 上: 4 shared unigrams of 8 and 6,
    # 2 shared bigrams (猫坐, 坐在) of 7 and 5, longest common subsequence 猫坐在上 (4)
    assert got["rouge1"] == pytest.approx(100 * 2 * (4 / 8) * (4 / 6) / (4 / 8 + 4 / 6))
    assert got["rouge2"] == pytest.approx(100 * 2 * (2 / 7) * (2 / 5) / (2 / 7 + 2 / 5))
    assert got["rougeL"] == got["rouge1"]
    assert 0 < got["bleu"] < 100
    # rouge-score's own tokenizer drops Chinese: the reason for ChineseRougeTokenizer
    assert rouge_scorer.RougeScorer(["rouge1"]).score(ref[0], pred[0])["rouge1"].fmeasure == 0


def test_identical_chinese_scores_100():
    texts = ["北京是中国的首都。", "我喜欢用Python编程"]
    got = text_scores(texts, texts)
    assert got["bleu_tokenize"] == "zh"
    for k in (*KEYS, "bleu"):
        assert got[k] == pytest.approx(100)


def test_chinese_rouge_tokenizer():
    tok = ChineseRougeTokenizer()
    assert tok.tokenize("我愛貓 Cats, ２０２０年！") == ["我", "愛", "貓", "cats", "2020", "年"]
    assert tok.tokenize("The cat-sat.") == rouge_scorer.tokenizers.DefaultTokenizer().tokenize(
        "The cat-sat."
    )


def test_corpus_language_is_decided_by_the_references():
    assert han_share(["北京是首都"]) == 1.0
    assert han_share(["Beijing (北京) is the capital"]) == pytest.approx(2 / 6)
    assert han_share([""]) == 0.0
    assert text_scores(["北京"], ["Beijing (北京) is the capital"])["bleu_tokenize"] == "13a"
    assert text_scores(["Beijing"], ["北京是首都 Beijing"])["bleu_tokenize"] == "zh"


def test_empty_and_unrelated_predictions():
    got = text_scores(["", ""], ["hello there", "猫"])
    assert {k: got[k] for k in (*KEYS, "bleu")} == {
        "rouge1": 0.0,
        "rouge2": 0.0,
        "rougeL": 0.0,
        "bleu": 0.0,
    }
    assert text_scores(["x"], ["y"])["rouge1"] == 0.0
    assert text_scores([], [])["bleu"] == 0.0
    with pytest.raises(ValueError):
        text_scores(["a"], [])
