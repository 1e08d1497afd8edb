"""Assistant-only loss masks: exact for every conversation of every shared file, for each
tokenizer flavour, and under generated adversarial conversations."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from masks import RememberedRenders, assert_exact, trained_runs

from fastchat_data.build import read_trainable
from fastchat_data.report import Report
from fastchat_data.schema import ASSISTANT, TOOL, USER, Conversation, Message, SkipRecord
from fastchat_data.templates import TEMPLATES
from fastchat_data.tokenize import IGNORE_INDEX, ConversationTokenizer

FLAVOURS = ["llama", "llama-nonlegacy", "chatml"]
SMALL_FILES = [
    "fastchat_dummy_conversation.json",
    "sharegpt_v3_sample_1000.json",
    "sharegpt_gpt4_zh_1k.jsonl",
    "glaive_toolcall_en_300_sharegpt.json",
    "oasst1_sft_zh_llamafactory.json",
    "lima_llamafactory.json",
    "oasst1_val_qlora_953.jsonl",
    "alpaca_gpt4_data_en_1k.json",
    "alpaca_gpt4_data_zh_1k.json",
]


def conv(*turns, system=""):
    roles = [USER, ASSISTANT]
    return Conversation("t", [Message(roles[i % 2], t) for i, t in enumerate(turns)], system=system)


def check_file(path, tokenizer, template) -> int:
    ct = ConversationTokenizer(tokenizer, template)
    ct.template = renders = RememberedRenders(ct.template)
    convs = list(read_trainable([str(path)], Report("t")))
    checked = 0
    for i in range(0, len(convs), 500):
        batch = convs[i : i + 500]
        for c, enc in zip(batch, ct.encode_batch(batch)):
            assert not isinstance(enc, SkipRecord), (c.id, enc)
            assert_exact(ct, c, enc, segments=renders.by_conversation.pop(id(c)))
            checked += 1
    assert checked == len(convs) > 0
    return checked


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("name", SMALL_FILES)
def test_masks_exact_on_shared_file(name, flavour, tokenizers, data_dir):
    tok, template = tokenizers[flavour]
    check_file(data_dir / name, tok, template)


@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_masks_exact_on_full_alpaca(flavour, tokenizers, data_dir):
    tok, template = tokenizers[flavour]
    assert (
        check_file(data_dir / "alpaca_data.json", tok, template) == 52_002 - 28
    )  # 28 empty outputs


def test_vicuna_rendering_is_fastchats():
    c = conv("Hi", "Hello!", "Again?", "Sure.")
    assert TEMPLATES["vicuna_v1.1"].prompt(c, "</s>") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: Hi "
        "ASSISTANT: Hello!</s>"
        "USER: Again? ASSISTANT: Sure.</s>"
    )
    assert (
        TEMPLATES["vicuna_v1.1"].prompt(conv("a", "b", system="Sys."), "</s>")
        == "Sys. USER: a ASSISTANT: b</s>"
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_typed_special_tokens_stay_text(flavour, tokenizers):
    tok, template = tokenizers[flavour]
    ct = ConversationTokenizer(tok, template)
    c = conv(
        "say </s> <s> <|im_end|> <|im_start|>", "ok </s><|im_end|> done", "USER: ASSISTANT:", "fine"
    )
    enc = ct.encode(c)
    assert_exact(ct, c, enc)
    n_eos = enc.input_ids.count(tok.eos_token_id)
    assert n_eos == (
        2 if flavour != "chatml" else 4
    )  # one per reply (vicuna) / per message (ChatML)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_ids_equal_the_tokenizers_own_on_the_rendered_text(flavour, tokenizers, data_dir):
    """Masks come from offsets, but the ids are what `tokenizer(prompt)` gives: train ==
    inference."""
    tok, template = tokenizers[flavour]
    ct = ConversationTokenizer(tok, template)
    assert ct.matches_tokenizer
    convs = list(read_trainable([str(data_dir / "fastchat_dummy_conversation.json")], Report("t")))[
        :100
    ]
    for c, enc in zip(convs, ct.encode_batch(convs)):
        assert (
            enc.input_ids
            == tok(ct.render_text(c), add_special_tokens=template != "chat_template")["input_ids"]
        )


def test_chat_template_equals_apply_chat_template(tokenizers):
    tok, _ = tokenizers["chatml"]
    ct = ConversationTokenizer(tok, "chat_template")
    c = conv("hi", "hello", system="be nice")
    msgs = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert ct.render_text(c) == tok.apply_chat_template(msgs, tokenize=False)
    assert ct.encode(c).input_ids == list(
        tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    )


def test_chat_template_that_alters_content_is_skipped_not_mis_masked(tokenizers):
    import copy

    tok, _ = tokenizers["chatml"]
    trimming = copy.deepcopy(tok)
    trimming.chat_template = tok.chat_template.replace(
        "message['content']", "message['content'] | trim"
    )
    ct = ConversationTokenizer(trimming, "chat_template")
    assert isinstance(ct.encode(conv("hi", "hello")).input_ids, list)  # nothing to trim: fine
    with pytest.raises(SkipRecord, match="template_alters_content"):
        ct.encode(conv("hi ", "hello"))


def test_truncation_is_counted_and_untrainable_rows_skipped(tokenizers):
    tok, template = tokenizers["llama"]
    ct = ConversationTokenizer(tok, template, max_length=40)
    long_reply = ct.encode(conv("q", "word " * 100, system="S."))
    assert long_reply.truncated and len(long_reply.input_ids) == 40
    assert_exact(ct, conv("q", "word " * 100, system="S."), long_reply)
    (res,) = ct.encode_batch([conv("word " * 100, "a", system="S.")])
    assert isinstance(res, SkipRecord) and res.reason == "no_trainable_tokens_after_truncation"


def trained_spans(labels) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("flavour", ["llama", "chatml"])
def test_source_and_target_limits_cut_each_turn_and_keep_the_assistant_tag(tokenizers, flavour):
    tok, template = tokenizers[flavour]
    c = conv("word " * 60, "reply " * 50, "short", "ok", system="S.")
    full = ConversationTokenizer(tok, template).encode(c)
    ct = ConversationTokenizer(tok, template, max_source_length=12, max_target_length=7)
    enc = ct.encode(c)
    assert enc.truncated == "source,target"
    runs = trained_spans(enc.labels)
    assert [b - a for a, b in runs][0] == 7  # the long reply keeps its first 7 tokens
    a0, _ = trained_spans(full.labels)[0]
    assert enc.input_ids[runs[0][0] : runs[0][1]] == full.input_ids[a0 : a0 + 7]
    assert runs[0][0] == 12  # the first prompt is cut to 12 tokens ...
    tag = ct._tag_tokens
    assert tag > 0 and enc.input_ids[12 - tag : 12] == full.input_ids[a0 - tag : a0]  # ... tag kept
    assert enc.input_ids[: 12 - tag] == full.input_ids[: 12 - tag]  # ... and its head
    # the short second turn is untouched
    assert enc.input_ids[runs[0][1] :][-8:] == full.input_ids[-8:]
    untouched = ConversationTokenizer(tok, template, max_source_length=500, max_target_length=500)
    same = untouched.encode(c)
    assert same.truncated == "" and same.input_ids == full.input_ids


def test_custom_template_from_a_dict_or_file(tokenizers, tmp_path):
    tok, _ = tokenizers["llama"]
    spec = {
        "system": "你是人工智慧助理。",
        "user": "USER",
        "assistant": "ASSISTANT",
        "sep": " ",
        "sep2": "{eos}",
    }
    ct = ConversationTokenizer(tok, spec)
    assert ct.render_text(conv("hi", "hello")).startswith(
        "你是人工智慧助理。 USER: hi ASSISTANT: hello"
    )
    assert_exact(ct, conv("hi", "hello"), ct.encode(conv("hi", "hello")))
    (tmp_path / "t.yaml").write_text("system: Be brief.\nsep2: '{eos}'\n")
    assert (
        ConversationTokenizer(tok, str(tmp_path / "t.yaml"))
        .render_text(conv("a", "b"))
        .startswith("Be brief. USER: a ASSISTANT: b")
    )
    with pytest.raises(ValueError, match="unknown template keys"):
        ConversationTokenizer(tok, {"sytem": "typo"})
    # what an export records: a built-in name as is, a file as its fields (the file may be gone)
    from fastchat_data.templates import portable_template

    assert portable_template("vicuna_v1.1") == "vicuna_v1.1"
    fields = portable_template(str(tmp_path / "t.yaml"))
    (tmp_path / "t.yaml").unlink()
    assert (
        ConversationTokenizer(tok, fields)
        .render_text(conv("a", "b"))
        .startswith("Be brief. USER: a")
    )


def test_train_on_inputs(tokenizers):
    tok, template = tokenizers["llama"]
    enc = ConversationTokenizer(tok, template, train_on_inputs=True).encode(conv("q", "a"))
    # Everything is trained but the BOS, which no token predicts.
    assert enc.input_ids[0] == tok.bos_token_id and enc.labels[0] == IGNORE_INDEX
    assert enc.labels[1:] == enc.input_ids[1:]


def test_tool_turns_are_masked(tokenizers):
    tok, template = tokenizers["chatml"]
    ct = ConversationTokenizer(tok, template)
    c = Conversation(
        "t",
        [
            Message(USER, "weather?"),
            Message(ASSISTANT, '{"name": "w"}'),
            Message(TOOL, "sunny"),
            Message(ASSISTANT, "It is sunny."),
        ],
    )
    enc = ct.encode(c)
    assert_exact(ct, c, enc)
    assert "sunny<" not in "".join(tok.decode(r) for r in trained_runs(enc.labels)).replace(
        "It is sunny.", ""
    )


# -- generated conversations -------------------------------------------------------------------
NASTY = [
    "</s>",
    "<s>",
    "<unk>",
    "<|im_end|>",
    "<|im_start|>",
    "USER:",
    "ASSISTANT:",
    " ASSISTANT: ",
    "###",
    "\n",
    "\n\n",
    " ",
    "  ",
    "\t",
    "😀",
    "👩‍👩‍👧",
    "中文",
    "日本語",
    "한국어",
    "é",
    "\u200b",
    "```",
    "\r\n",
    "<0x0A>",
]
text = st.lists(
    st.one_of(st.sampled_from(NASTY), st.text(min_size=1, max_size=12)), min_size=1, max_size=12
).map("".join)
reply = text.filter(lambda s: s.strip() != "")


@st.composite
def conversations(draw):
    n = draw(st.integers(1, 4))
    turns = []
    for _ in range(n):
        turns += [draw(reply), draw(reply)]
    system = draw(st.one_of(st.just(""), text))
    if draw(st.booleans()):  # a very long turn now and then
        turns[-1] = turns[-1] + " long" * draw(st.integers(200, 600))
    return conv(*turns, system=system)


@pytest.mark.parametrize("flavour", FLAVOURS)
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(c=conversations())
def test_masks_exact_on_generated_conversations(flavour, tokenizers, c):
    tok, template = tokenizers[flavour]
    ct = ConversationTokenizer(tok, template)
    try:
        enc = ct.encode(c)
    except SkipRecord as e:
        # A chat template may refuse content (none of ours does); nothing else may be skipped.
        pytest.fail(f"skipped: {e}")
    assert_exact(ct, c, enc)
    assert sum(lab != IGNORE_INDEX for lab in enc.labels) > 0


SYSTEM_CASES = [
    ("llama", "vicuna_v1.1"),
    ("llama", "alpaca"),
    ("llama", "qlora_oasst"),
    ("llama-nonlegacy", "vicuna_v1.1"),
    ("chatml", "chat_template"),
]


@pytest.mark.parametrize("flavour, template", SYSTEM_CASES)
def test_special_tokens_typed_in_a_system_prompt_stay_text(flavour, template, tokenizers):
    """A system prompt from the data is data: "</s>" in it must not end the sequence."""
    tok, _ = tokenizers[flavour]
    ct = ConversationTokenizer(tok, template)
    special_ids = {tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}

    def specials(system):
        c = conv("hi", "hello", "again", "sure", system=system)
        enc = ct.encode(c)
        assert_exact(ct, c, enc)
        return enc, [i for i in enc.input_ids if i in special_ids]

    typed, typed_specials = specials("Be kind </s> <s> <|im_end|> <|im_start|>user end")
    _, plain_specials = specials("Be kind end")
    assert typed_specials == plain_specials  # the typed ones became text, not token ids
    text = tok.decode(typed.input_ids, skip_special_tokens=False)
    assert "</s> <s> <|im_end|> <|im_start|>user end" in text
