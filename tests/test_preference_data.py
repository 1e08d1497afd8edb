"""Preference data: the three input shapes, bad inputs, `pair` on the real Alpaca files, and
the tokenized rows against the SFT encoding of the same conversations."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import datasets
import pytest
from train_utils import flags

from fastchat_data.preference import (
    PREFERENCE_COLUMNS,
    PreferencePair,
    build_preference_dataset,
    convert_pairs,
    encode_pairs,
    iter_pairs,
    pair,
    read_pairs,
)
from fastchat_data.report import Report
from fastchat_data.schema import ASSISTANT, USER, Conversation, DataError, Message, SkipRecord
from fastchat_data.tokenize import IGNORE_INDEX, ConversationTokenizer

GPT4 = "alpaca_gpt4_data_en_1k.json"
DAVINCI = "alpaca_data.json"


def write(path, records, lines=False):
    if lines:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return str(path)


def read(path, fmt=None, strict=False):
    rep = Report("t", strict=strict)
    return list(read_pairs([str(path)], rep, fmt)), rep


def msgs(*pairs):
    return [Message(r, c) for r, c in pairs]


# a three-turn prompt in the messages shape, which several records below share
Q1_A1_Q2 = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
]


def llamafactory_pair(turns: list[str], chosen: str, rejected: str, system: str) -> dict:
    """A LlamaFactory ShareGPT pair: `turns` alternate human and gpt, the replies are gpt
    messages (the shape's fullest form)."""
    return {
        "conversations": [
            {"from": ("human", "gpt")[i % 2], "value": text} for i, text in enumerate(turns)
        ],
        "chosen": {"from": "gpt", "value": chosen},
        "rejected": {"from": "gpt", "value": rejected},
        "system": system,
    }


# -- shapes ----------------------------------------------------------------------------------


def test_shape_pairs_strings_with_system_and_alpaca_fields(tmp_path):
    src = write(
        tmp_path / "p.jsonl",
        [
            {
                "id": "a",
                "system": "Be brief.",
                "prompt": "What is 2+2?",
                "chosen": "4",
                "rejected": "5",
            },
            {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
            {"instruction": "Add", "input": "2 and 2", "chosen": "4", "rejected": "22"},
            {
                "prompt": Q1_A1_Q2,
                "chosen": "good",
                "rejected": "bad",
            },
        ],
        lines=True,
    )
    pairs, rep = read(src)
    assert rep.read == 4 and rep.dropped_total == 0 and rep.notes["format"] == "pairs"
    assert pairs[0] == PreferencePair("a", "Be brief.", msgs((USER, "What is 2+2?")), "4", "5")
    assert pairs[1] == PreferencePair("p_1", "", msgs((USER, "Hi")), "Hello!", "Go away.")
    # the Alpaca prompt is built as SFT builds it
    assert pairs[2].prompt == msgs((USER, "Add\nInput:\n2 and 2")) and pairs[2].rejected == "22"
    assert pairs[3].prompt == msgs((USER, "q1"), (ASSISTANT, "a1"), (USER, "q2"))


def test_shape_messages_ultrafeedback_prompt_repeated_shared_or_apart(tmp_path):
    def side(reply):
        return [
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": reply},
        ]

    src = write(
        tmp_path / "uf.json",
        [
            # UltraFeedback binarized: `prompt` also heads both lists
            {"prompt": "Name a color.", "chosen": side("Blue."), "rejected": side("Seven.")},
            # no `prompt`: the shared prefix is the prompt, with a system turn
            {
                "id": "s",
                "chosen": [{"role": "system", "content": "Sys"}, *side("Red.")],
                "rejected": [{"role": "system", "content": "Sys"}, *side("Dog.")],
            },
            # prompt apart, the lists hold only the replies
            {
                "prompt": [{"role": "user", "content": "Name a color."}],
                "chosen": [{"role": "assistant", "content": "Green."}],
                "rejected": [{"role": "assistant", "content": "Cat."}],
            },
        ],
    )
    pairs, rep = read(src)
    assert rep.dropped_total == 0 and rep.notes["format"] == "messages"
    q = msgs((USER, "Name a color."))
    assert pairs[0] == PreferencePair("uf_0", "", q, "Blue.", "Seven.")
    assert pairs[1] == PreferencePair("s", "Sys", q, "Red.", "Dog.")
    assert pairs[2] == PreferencePair("uf_2", "", q, "Green.", "Cat.")


def test_shape_sharegpt_llamafactory(tmp_path):
    src = write(
        tmp_path / "lf.json",
        [
            llamafactory_pair(["Hi", "Hello", "Joke?"], "A pun.", "No.", "Be fun."),
            {"conversations": [{"from": "human", "value": "Q"}], "chosen": "yes", "rejected": "no"},
        ],
    )
    pairs, rep = read(src)
    assert rep.dropped_total == 0 and rep.notes["format"] == "sharegpt"
    assert pairs[0] == PreferencePair(
        "lf_0",
        "Be fun.",
        msgs((USER, "Hi"), (ASSISTANT, "Hello"), (USER, "Joke?")),
        "A pun.",
        "No.",
    )
    assert pairs[1].prompt == msgs((USER, "Q")) and (pairs[1].chosen, pairs[1].rejected) == (
        "yes",
        "no",
    )


def test_convert_pairs_round_trips_through_every_shape(tmp_path):
    src = write(
        tmp_path / "p.json",
        [
            {"id": "a", "system": "S", "prompt": "q", "chosen": "c", "rejected": "r"},
            {
                "id": "b",
                "prompt": Q1_A1_Q2,
                "chosen": "c2",
                "rejected": "r2",
            },
        ],
    )
    original, _ = read(src)
    path = src
    for shape in ("messages", "sharegpt", "pairs"):
        out = str(tmp_path / f"{shape}.jsonl")
        rep = convert_pairs(path, out, to=shape)
        assert rep.written == 2
        again, rep2 = read(out)
        assert rep2.notes["format"] == shape and again == original
        path = out


# -- bad inputs ------------------------------------------------------------------------------

BAD = {
    "missing_field": ({"prompt": "q", "chosen": "c"}, "missing_field", "rejected is missing"),
    "wrong_type": (
        {"prompt": "q", "chosen": 3, "rejected": "r"},
        "non_string_value",
        "chosen is int",
    ),
    "prompt_wrong_type": (
        {"prompt": 7, "chosen": "c", "rejected": "r"},
        "non_string_value",
        "prompt is int",
    ),
    "empty_reply": (
        {"prompt": "q", "chosen": "  ", "rejected": "r"},
        "empty_reply",
        "chosen reply is empty",
    ),
    "identical": (
        {"prompt": "q", "chosen": "same ", "rejected": "same"},
        "identical_replies",
        "same text",
    ),
    "prompt_ends_in_assistant": (
        {
            "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "chosen": "c",
            "rejected": "r",
        },
        "prompt_not_ending_in_user_turn",
        "ends with a assistant turn",
    ),
    "empty_prompt_turn": ({"prompt": " ", "chosen": "c", "rejected": "r"}, "empty_value", "turn 0"),
    "bad_role": (
        {"prompt": [{"role": "narrator", "content": "q"}], "chosen": "c", "rejected": "r"},
        "unknown_role",
        "'narrator'",
    ),
    "reply_from_user": (
        {"prompt": "q", "chosen": {"from": "human", "value": "c"}, "rejected": "r"},
        "malformed_record",
        "not an assistant reply",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_is_counted_or_strict_error(tmp_path, case):
    record, reason, detail = BAD[case]
    good = {"prompt": "fine", "chosen": "yes", "rejected": "no"}
    src = write(tmp_path / "d.json", [good, record])
    pairs, rep = read(src)
    assert len(pairs) == 1 and rep.read == 2 and rep.dropped == {reason: 1}
    assert detail in rep.examples[reason][0] and "d.json: record 1" in rep.examples[reason][0]
    with pytest.raises(DataError, match=rf"d\.json: record 1: {reason}: .*{detail}"):
        read(src, strict=True)


def test_messages_shape_bad_records(tmp_path):
    u = {"role": "user", "content": "q"}
    src = write(
        tmp_path / "m.json",
        [
            {
                "chosen": [u, {"role": "assistant", "content": "c"}],
                "rejected": [u, {"role": "assistant", "content": "r"}],
            },
            {
                "chosen": [u, {"role": "assistant", "content": "c"}],
                "rejected": [
                    {"role": "user", "content": "other"},
                    {"role": "assistant", "content": "r"},
                ],
            },
            {"chosen": [u, {"role": "assistant", "content": "c"}], "rejected": [u]},
            {"chosen": [u, {"role": "assistant", "content": "c"}], "rejected": "r"},
            {"chosen": [u, {"role": "assistant", "content": "c"}]},
        ],
    )
    pairs, rep = read(src)
    assert len(pairs) == 1
    assert rep.dropped == {"prompts_differ": 1, "malformed_record": 2, "missing_field": 1}


def test_truncated_json_and_unknown_shape_are_data_errors(tmp_path):
    cut = tmp_path / "cut.jsonl"
    cut.write_text(
        json.dumps({"prompt": "q", "chosen": "c", "rejected": "r"}) + "\n" + '{"prompt": "q", "cho'
    )
    with pytest.raises(
        DataError, match=r"cut\.jsonl: line 2 column \d+: malformed JSON.*truncated"
    ):
        read(cut)
    arr = tmp_path / "cut.json"
    arr.write_text(json.dumps([{"prompt": "q", "chosen": "c", "rejected": "r"}] * 3)[:-20])
    with pytest.raises(DataError, match=r"cut\.json: line 1 column \d+: malformed JSON"):
        read(arr)
    sft = write(tmp_path / "sft.json", [{"instruction": "q", "output": "a"}])
    with pytest.raises(DataError, match=r"sft\.json: record 0: not a preference record"):
        read(sft)
    with pytest.raises(DataError, match="unknown preference shape 'ultra'"):
        list(iter_pairs(sft, Report("t"), fmt="ultra"))


# -- pair on the real files ------------------------------------------------------------------


def test_pair_real_alpaca_files(tmp_path, data_dir):
    gpt4 = json.loads((data_dir / GPT4).read_text())
    davinci = {
        (" ".join(r["instruction"].split()), " ".join(r["input"].split())): r["output"]
        for r in json.loads((data_dir / DAVINCI).read_text())
    }
    train, held, report = tmp_path / "train.jsonl", tmp_path / "held.json", tmp_path / "rep.json"
    rep = pair(
        str(data_dir / GPT4),
        str(data_dir / DAVINCI),
        str(train),
        heldout=100,
        heldout_out=str(held),
        seed=0,
        report=str(report),
    )
    # every one of the 1,000 GPT-4 records is in alpaca_data.json; 42 answers are the same, and
    # 14 records repeat an earlier one whole (13 prompts appear 2 or 3 times)
    assert rep.read == 1000 and rep.notes["matched"] == 1000 and rep.notes["unmatched"] == 0
    assert rep.notes["identical"] == 42 and rep.notes["duplicates"] == 14
    assert rep.dropped == {"identical_replies": 42, "duplicate_pair": 14}
    assert rep.written == 944 and json.loads(report.read_text())["written"] == 944
    tr = [json.loads(x) for x in train.read_text().splitlines()]
    ho = json.loads(held.read_text())
    assert len(tr) == 844 and len(ho) == 100
    assert not {r["prompt"] for r in tr} & {r["prompt"] for r in ho}
    assert len({r["prompt"] for r in tr + ho}) == 944
    for r in tr + ho:
        i = int(r["id"].rsplit("_", 1)[1])
        src = gpt4[i]
        assert r["chosen"] == src["output"]
        assert (
            r["rejected"]
            == davinci[(" ".join(src["instruction"].split()), " ".join(src["input"].split()))]
        )
        assert r["chosen"].strip() != r["rejected"].strip()
        assert r["prompt"].startswith(src["instruction"]) and (src["input"] in r["prompt"])
    # the output reads back as preference pairs, none skipped
    pairs, rep2 = read(train)
    assert len(pairs) == 844 and rep2.dropped_total == 0
    # the same seed holds out the same pairs; another seed others
    held2 = tmp_path / "held2.json"
    for seed, same in ((0, True), (1, False)):
        pair(
            str(data_dir / GPT4),
            str(data_dir / DAVINCI),
            str(tmp_path / f"t{seed}.json"),
            heldout=100,
            heldout_out=str(held2),
            seed=seed,
        )
        assert (json.loads(held2.read_text()) == ho) == same


def test_pair_options_and_unmatched(tmp_path):
    chosen = write(
        tmp_path / "c.json",
        [
            {"instruction": "Say  hi", "input": "", "output": "Hi!"},
            {"instruction": "Unknown", "input": "", "output": "x"},
            {"instruction": "Same", "input": "", "output": "s"},
            {"instruction": "No output", "input": ""},
        ],
    )
    rejected = write(
        tmp_path / "r.json",
        [
            {"instruction": "Say hi ", "input": "", "output": "hello"},
            {"instruction": "Same", "input": "", "output": "s"},
        ],
    )
    out = str(tmp_path / "o.json")
    rep = pair(chosen, rejected, out)
    assert rep.read == 4 and rep.written == 1 and rep.notes["matched"] == 2
    assert rep.dropped == {"unmatched": 1, "identical_replies": 1, "missing_field": 1}
    assert json.loads(open(out).read()) == [
        {"id": "c_0", "prompt": "Say  hi", "chosen": "Hi!", "rejected": "hello"}
    ]
    assert pair(chosen, rejected, out, keep_identical=True).written == 2
    with pytest.raises(DataError, match=r"c\.json: record 3: missing_field: output is missing"):
        pair(chosen, rejected, out, strict=True)
    with pytest.raises(DataError, match="--heldout_out: value: is needed with --heldout 1"):
        pair(chosen, rejected, out, heldout=1)
    with pytest.raises(DataError, match="leaves no training pairs"):
        pair(chosen, rejected, out, heldout=1, heldout_out=str(tmp_path / "h.json"))
    with pytest.raises(DataError, match="is also an input file"):
        pair(chosen, rejected, chosen)


def test_pair_drops_repeats_and_holds_out_whole_prompts(tmp_path):
    chosen = write(
        tmp_path / "c.jsonl",
        [{"instruction": f"Q{i % 5}", "input": "", "output": f"good {i}"} for i in range(10)]
        + [{"instruction": "Q0", "input": "", "output": "good 0"}],
        lines=True,
    )
    rejected = write(
        tmp_path / "r.json",
        [{"instruction": f"Q{i}", "input": "", "output": f"bad {i}"} for i in range(5)],
    )
    for seed in range(5):
        held = tmp_path / "h.jsonl"
        rep = pair(
            chosen, rejected, str(tmp_path / "t.jsonl"), heldout=4, heldout_out=str(held), seed=seed
        )
        assert rep.read == 11 and rep.dropped == {"duplicate_pair": 1} and rep.written == 10
        tr = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
        ho = [json.loads(x) for x in held.read_text().splitlines()]
        # two pairs per prompt: the held-out set is two whole prompts, none of them in training
        assert len(ho) == 4 and len(tr) == 6
        assert len({r["prompt"] for r in ho}) == 2
        assert not {r["prompt"] for r in tr} & {r["prompt"] for r in ho}


# -- tokenized rows --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alpaca_pairs(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("pairs")
    out = d / "pairs.jsonl"
    pair(str(data_dir / GPT4), str(data_dir / DAVINCI), str(out))
    small = d / "small.jsonl"
    small.write_text("".join(out.read_text().splitlines(keepends=True)[:300]))
    return small


def check_rows_against_sft(ds, pairs, tok, template, max_length):
    """Each side's row is the SFT encoding of prompt + that reply, with only the final reply
    trained; the prompt ids of both sides are the same."""
    sft = ConversationTokenizer(tok, template, max_length=max_length)
    rows = {r["id"]: r for r in ds}
    assert set(rows) <= {p.id for p in pairs}
    for p in pairs:
        if p.id not in rows:
            continue
        row = rows[p.id]
        n = row["prompt_length"]
        assert row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n]
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            enc = sft.encode(p.conversation(side))
            assert ids == enc.input_ids and row[f"{side}_length"] == len(ids) <= max_length
            assert labels[:n] == [IGNORE_INDEX] * n
            assert labels[n:] == enc.labels[n:] and labels[n] == ids[n]  # the reply starts at n
            if len(p.prompt) == 1:  # one turn: exactly the SFT labels
                assert labels == enc.labels
            else:  # the earlier replies are trained by SFT, not here
                assert enc.labels[:n] != labels[:n]
            # the trained tokens are one run: the reply (and its end token, as SFT trains it)
            trained = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
            assert trained == list(range(n, trained[-1] + 1))
            text = tok.decode([ids[i] for i in trained], skip_special_tokens=True)
            reply = getattr(p, side)
            if not enc.truncated:
                assert text.strip() == reply.strip() or " ".join(text.split()) == " ".join(
                    reply.split()
                )
            if template == "vicuna_v1.1":  # the prompt is what SFT gives a model to reply to
                assert ids[:n] == sft.encode_prompt(Conversation(p.id, p.prompt, p.system))


@pytest.mark.parametrize("flavour", ["llama", "chatml"])
def test_rows_equal_sft_encoding(tmp_path, tokenizers, alpaca_pairs, flavour):
    tok, template = tokenizers[flavour]
    ds, rep = build_preference_dataset(
        str(alpaca_pairs), tok, template, max_length=384, cache_dir=str(tmp_path)
    )
    assert tuple(ds.column_names) == PREFERENCE_COLUMNS
    assert (
        rep.read == 300 and rep.written == len(ds) and rep.read == rep.written + rep.dropped_total
    )
    assert rep.truncated > 0 and max(ds["chosen_length"]) == 384  # long GPT-4 replies are cut
    pairs, _ = read(alpaca_pairs)
    check_rows_against_sft(ds, pairs, tok, template, 384)


def test_multi_turn_rows_train_only_the_final_reply(tmp_path, tokenizers):
    src = write(
        tmp_path / "lf.json",
        [
            llamafactory_pair(
                ["Hi there", "Hello, how can I help?", "Tell me a joke."],
                "Why did the chicken cross the road?",
                "No.",
                "Be fun.",
            ),
            {
                "conversations": [{"from": "human", "value": "What is the capital of France?"}],
                "chosen": "Paris.",
                "rejected": "London.",
            },
        ],
    )
    pairs, _ = read(src)
    for flavour in ("llama", "llama-nonlegacy", "chatml"):
        tok, template = tokenizers[flavour]
        ds, rep = build_preference_dataset(
            src, tok, template, max_length=256, cache_dir=str(tmp_path), quiet=True
        )
        assert rep.written == 2 and rep.truncated == 0
        check_rows_against_sft(ds, pairs, tok, template, 256)


def test_truncation_cuts_the_reply_and_a_long_prompt_is_skipped(tmp_path, tokenizers):
    tok, template = tokenizers["llama"]
    src = write(
        tmp_path / "t.json",
        [
            {"prompt": "Tell me a story.", "chosen": "Once upon a time " * 40, "rejected": "No."},
            {"prompt": "word " * 200, "chosen": "yes", "rejected": "no"},
            {"prompt": "Hi", "chosen": "Hello!", "rejected": "Bye."},
        ],
    )
    ds, rep = build_preference_dataset(
        src, tok, template, max_length=128, cache_dir=str(tmp_path), quiet=True
    )
    assert rep.read == 3 and rep.written == 2 and rep.dropped == {"prompt_too_long": 1}
    assert rep.truncated == 1 and rep.notes["truncated_by"] == {"chosen": 1}
    assert "t.json" not in rep.examples["prompt_too_long"][0]  # found by the tokenizer
    assert "pair 1" in rep.examples["prompt_too_long"][0]
    long = ds[0]
    assert long["chosen_length"] == 128 and long["rejected_length"] < 128
    assert (
        long["chosen_input_ids"][: long["prompt_length"]]
        == long["rejected_input_ids"][: long["prompt_length"]]
    )
    assert long["chosen_labels"][-1] != IGNORE_INDEX  # the reply runs to the cut
    pairs, _ = read(src)
    check_rows_against_sft(ds, pairs, tok, template, 128)
    with pytest.raises(DataError, match=r"tokenize: pair 1 \(id t_1\): prompt_too_long"):
        build_preference_dataset(
            src, tok, template, max_length=128, cache_dir=str(tmp_path), strict=True, quiet=True
        )
    with pytest.raises(DataError, match="too small"):
        build_preference_dataset(
            src, tok, template, max_length=3, cache_dir=str(tmp_path), quiet=True
        )


def test_prompt_rendered_differently_per_reply_is_skipped(tmp_path, tokenizers):
    """A chat template that renders the prompt according to the reply cannot give one prompt
    for both sides: the pair is skipped and counted, never trained with a wrong prompt."""
    tok, _ = tokenizers["chatml"]
    marking = copy.deepcopy(tok)
    marking.chat_template = tok.chat_template.replace(
        "'<|im_start|>' + message['role']",
        "'<|im_start|>' + message['role'] "
        "+ (' long' if loop.last and message['content'] | length > 20 else '')",
    )
    src = write(
        tmp_path / "m.json",
        [
            {"prompt": "Hi", "chosen": "A reply that is rather long.", "rejected": "Short."},
            {"prompt": "Hi", "chosen": "Fine.", "rejected": "Short."},
        ],
    )
    ds, rep = build_preference_dataset(
        src, marking, "chat_template", max_length=128, cache_dir=str(tmp_path), quiet=True
    )
    # the SFT encoder already refuses a template whose layout depends on message text
    assert rep.written == 1 and rep.dropped_total == 1 and ds[0]["id"] == "m_1"


class MergingAcrossBoundary(ConversationTokenizer):
    """The real encoder, then what a tokenizer that merges the prompt's last token with a reply
    starting "!" would give: another id before the reply (no tokenizer at hand does this)."""

    def encode_batch(self, convs):
        out = super().encode_batch(convs)
        for conv, enc in zip(convs, out):
            if conv.messages[-1].content.startswith("!"):
                start = next(i for i, x in enumerate(enc.labels) if x != IGNORE_INDEX)
                enc.input_ids[start - 1] = 7
        return out


def test_prompt_tokens_that_differ_between_sides_are_skipped(tokenizers):
    tok, template = tokenizers["llama"]
    enc = MergingAcrossBoundary(tok, template)
    pairs = [
        PreferencePair("a", "", msgs((USER, "Hi")), "!Hello", "Bye"),
        PreferencePair("b", "", msgs((USER, "Hi")), "Hello", "Bye"),
    ]
    rows = encode_pairs(pairs, enc, 256)
    assert isinstance(rows[0], SkipRecord) and rows[0].reason == "prompt_tokens_differ"
    assert isinstance(rows[1], dict) and rows[1]["id"] == "b"


def test_cache_hit_out_folder_and_errors(tmp_path, llama_dir):
    src = write(
        tmp_path / "p.json",
        [
            {"prompt": "Hi", "chosen": "Hello!", "rejected": "Bye."},
            {"prompt": "Hi", "chosen": "same", "rejected": "same"},
        ],
    )
    cache, out = tmp_path / "cache", tmp_path / "out"
    ds, rep = build_preference_dataset(
        src, str(llama_dir), cache_dir=str(cache), out=str(out), quiet=True
    )
    assert rep.notes["cache"].startswith("built") and rep.dropped == {"identical_replies": 1}
    assert datasets.load_from_disk(str(out))["chosen_input_ids"] == ds["chosen_input_ids"]
    ds2, rep2 = build_preference_dataset(src, str(llama_dir), cache_dir=str(cache), quiet=True)
    assert rep2.notes["cache"].startswith("hit") and rep2.dropped == {"identical_replies": 1}
    assert ds2["chosen_labels"] == ds["chosen_labels"]
    _, rep3 = build_preference_dataset(
        src, str(llama_dir), max_length=100, cache_dir=str(cache), quiet=True
    )
    assert rep3.notes["cache"].startswith("built")
    # the SFT cache of the same file and tokenizer is another entry
    assert len(list((cache / "datasets").iterdir())) == 2
    bad = write(tmp_path / "bad.json", [{"prompt": "Hi", "chosen": "", "rejected": "x"}])
    with pytest.raises(
        DataError,
        match=r"bad\.json: all 1 records: no preference pair is usable \(skipped 1 empty_reply\)",
    ):
        build_preference_dataset(bad, str(llama_dir), cache_dir=str(cache), quiet=True)
    with pytest.raises(DataError, match="nope.json: file: does not exist"):
        build_preference_dataset(str(tmp_path / "nope.json"), str(llama_dir), cache_dir=str(cache))


# -- the command line ------------------------------------------------------------------------


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "fastchat_data", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_pair_then_build_pairs(tmp_path, llama_dir, data_dir):
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    res = run(
        "pair",
        *flags(
            chosen=data_dir / GPT4,
            rejected=data_dir / DAVINCI,
            out=train,
            heldout=100,
            heldout_out=held,
            seed=0,
        ),
    )
    assert res.returncode == 0, res.stderr
    assert (
        "[pair] read 1,000  written 944  dropped 56" in res.stderr and "matched: 1000" in res.stderr
    )
    assert len(held.read_text().splitlines()) == 100
    out = tmp_path / "ds"
    res = run(
        "build_pairs",
        *flags(
            data=held,
            tokenizer=llama_dir,
            max_length=512,
            out=out,
            cache_dir=tmp_path / "cache",
            report=tmp_path / "r.json",
        ),
    )
    assert res.returncode == 0, res.stderr
    assert "[build_pairs] read 100  written 100" in res.stderr
    assert len(datasets.load_from_disk(str(out))) == 100
    assert json.loads((tmp_path / "r.json").read_text())["written"] == 100
    res = run("build_pairs", "--data", tmp_path / "nope.json", "--tokenizer", llama_dir)
    assert (
        res.returncode == 2
        and res.stderr.strip() == f"error: {tmp_path / 'nope.json'}: file: does not exist"
    )
    res = run("convert_pairs", "--data", held, "--out", tmp_path / "lf.json", "--to", "sharegpt")
    assert res.returncode == 0 and "[convert_pairs] read 100  written 100" in res.stderr
