"""Exports carry the training template as the tokenizer's chat template: any tool that renders
prompts with `apply_chat_template` (transformers, vLLM, TGI) gets the ids training used, and
generation_config.json stops where the template ends a reply."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import QLORA, env, flags, train
from transformers import AutoTokenizer

from fastchat_data.build import read_trainable
from fastchat_data.report import Report
from fastchat_data.schema import ASSISTANT, SYSTEM, TOOL, USER, Conversation, Message
from fastchat_data.templates import (
    CHAT_TEMPLATE,
    ChatTemplate,
    SeparatorTemplate,
    get_template,
    jinja_chat_template,
    reply_end,
    special_tokens,
)
from fastchat_data.tokenize import ConversationTokenizer
from recipes.core.generate import save_for_inference, trained_template

FILES = [
    "fastchat_dummy_conversation.json",  # 500, short multi-turn
    "sharegpt_v3_sample_1000.json",  # 660 after validation: long, code, HTML, one system turn
    "glaive_toolcall_en_300_sharegpt.json",  # system prompts, tool calls and tool results
    "alpaca_gpt4_data_en_1k.json",  # instruction + input
    "oasst1_sft_zh_llamafactory.json",  # Chinese, multi-turn history
    "lima_llamafactory.json",
]
BUILT_IN = ["vicuna_v1.1", "alpaca", "qlora_oasst"]
# Text that a Jinja template must carry through untouched: quotes, a backslash, Jinja's own
# delimiters, newlines, non-ASCII, and a special token spelled in template text.
CUSTOM_YAML = r"""
name: careful_bot
system: "You are \"Careful Bot\" \\ {{ not jinja }} {% raw %} #} 你好.\nBe brief."
user: "### User"
assistant: "### Bot"
tool: "### Tool result"
sep: "\n"
sep2: "\n{eos}"
"""


def as_messages(conv: Conversation) -> list[dict]:
    system = [{"role": SYSTEM, "content": conv.system}] if conv.system else []
    return system + [{"role": m.role, "content": m.content} for m in conv.messages]


@pytest.fixture(scope="module")
def custom_yaml(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tpl") / "careful_bot.yaml"
    path.write_text(CUSTOM_YAML)
    return str(path)


@pytest.fixture(scope="module")
def conversations(data_dir) -> dict[str, list[Conversation]]:
    """Every conversation of each file, as the repo reads and validates them for training."""
    return {name: list(read_trainable([str(data_dir / name)], Report("t"))) for name in FILES}


def exported(tokenizer_dir, template, tmp_path) -> tuple:
    """(the tokenizer an export writes, reloaded as any tool loads it; what camelid.json records)"""
    folder = tmp_path / "export"
    record = save_for_inference(AutoTokenizer.from_pretrained(tokenizer_dir), template, folder)
    return AutoTokenizer.from_pretrained(folder), record


def spells_special_token(conv: Conversation, tokenizer) -> bool:
    names = special_tokens(tokenizer)
    return any(s in t for s in names for t in [conv.system, *(m.content for m in conv.messages)])


def compare(convs: list[Conversation], ours: ConversationTokenizer, theirs) -> dict:
    """Whole conversations through apply_chat_template(tokenize=True) against training's ids,
    and each conversation without its last reply, add_generation_prompt=True, against
    encode_prompt. A message that spells a special token (`</s>`) is left out: training keeps
    it as characters, a rendered string makes it the token (see test_typed_special_tokens)."""
    convs = [c for c in convs if not spells_special_token(c, theirs)]
    want = [e.input_ids for e in ours.encode_batch(convs)]
    got = theirs.apply_chat_template([as_messages(c) for c in convs], tokenize=True)["input_ids"]
    prompts = [Conversation(c.id, c.messages[:-1], c.system) for c in convs]
    want_prompt = [ours.encode_prompt(p) for p in prompts]
    got_prompt = theirs.apply_chat_template(
        [as_messages(p) for p in prompts], tokenize=True, add_generation_prompt=True
    )["input_ids"]
    for c, g, w, gp, wp in zip(convs, got, want, got_prompt, want_prompt):
        assert g == w, (c.id, theirs.decode(g[:80]), theirs.decode(w[:80]))
        assert gp == wp, c.id
    assert ours.boundary_splits == 0  # training's ids are the rendered text's ids
    return {"conversations": len(convs), "with_system": sum(bool(c.system) for c in convs)}


SAMPLE = 200


def sample(convs: list[Conversation], rest: bool = False) -> list[Conversation]:
    """The first SAMPLE conversations and every later one with a system prompt of its own;
    `rest`: all the others (the two together are every conversation, each once)."""
    if rest:
        return [c for c in convs[SAMPLE:] if not c.system]
    return convs[:SAMPLE] + [c for c in convs[SAMPLE:] if c.system]


def check_shared_data(template, llama_dir, conversations, tmp_path, rest, capsys) -> None:
    theirs, _ = exported(llama_dir, template, tmp_path)
    ours = ConversationTokenizer(AutoTokenizer.from_pretrained(llama_dir), template)
    picked = {name: sample(convs, rest) for name, convs in conversations.items()}
    picked = {name: convs for name, convs in picked.items() if convs}  # glaive's all have a system
    counts = {name: compare(convs, ours, theirs)["conversations"] for name, convs in picked.items()}
    assert counts == {name: len(c) for name, c in picked.items()}  # none spells a special token
    with capsys.disabled():
        print(f"\n{Path(template).name}: identical ids, whole and prompt-only, per file: {counts}")
    if not rest:
        assert sum(bool(c.system) for convs in picked.values() for c in convs) >= 300  # glaive's


@pytest.mark.parametrize("template", [*BUILT_IN, "custom_yaml"])
def test_exported_chat_template_gives_training_ids_on_shared_data(
    template, llama_dir, conversations, custom_yaml, tmp_path, capsys
):
    """Llama tokenizer (legacy, FastChat's), the first 200 conversations of each file and all
    with a system prompt (about 1,300): the ids depend on the template text around each
    message and on the message's own edges, which these cover; the slow test below checks the
    other ~2,950, so that CI compares all 4,255 once."""
    template = custom_yaml if template == "custom_yaml" else template
    check_shared_data(template, llama_dir, conversations, tmp_path, False, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("template", [*BUILT_IN, "custom_yaml"])
def test_exported_chat_template_gives_training_ids_on_the_rest_of_the_shared_data(
    template, llama_dir, conversations, custom_yaml, tmp_path, capsys
):
    template = custom_yaml if template == "custom_yaml" else template
    check_shared_data(template, llama_dir, conversations, tmp_path, True, capsys)


@pytest.mark.parametrize("flavour", ["llama-nonlegacy", "chatml"])
@pytest.mark.parametrize("template", [*BUILT_IN, "custom_yaml"])
def test_exported_chat_template_on_other_tokenizers(
    flavour, template, tokenizers, conversations, custom_yaml, tmp_path
):
    """Llama legacy=False (Metaspace "first": training's text starts with "▁" after BOS, which
    the template writes as a space) and byte-level BPE without BOS, eos <|im_end|>. Two files:
    the short multi-turn one and the one with system prompts and tool turns."""
    template = custom_yaml if template == "custom_yaml" else template
    tok, _ = tokenizers[flavour]
    theirs, _ = exported(tok.name_or_path, template, tmp_path)
    ours = ConversationTokenizer(AutoTokenizer.from_pretrained(tok.name_or_path), template)
    for name in ("fastchat_dummy_conversation.json", "glaive_toolcall_en_300_sharegpt.json"):
        assert compare(conversations[name], ours, theirs)["conversations"] == len(
            conversations[name]
        )


@pytest.mark.parametrize("flavour", ["llama", "llama-nonlegacy", "chatml"])
def test_system_prompt_roles_and_edges(flavour, tokenizers, custom_yaml, tmp_path):
    """The system prompt: the template's, the data's (even one that starts with a space or
    a newline), an empty one (the template's then, as in training); tool turns."""
    tok, _ = tokenizers[flavour]
    for template in [*BUILT_IN, custom_yaml]:
        theirs, _ = exported(tok.name_or_path, template, tmp_path / Path(template).name)
        ours = ConversationTokenizer(AutoTokenizer.from_pretrained(tok.name_or_path), template)
        convs = [
            Conversation("default", [Message(USER, "Hi"), Message(ASSISTANT, "Hello!")]),
            Conversation("own", [Message(USER, "Hi"), Message(ASSISTANT, "Yo")], "Be terse."),
            Conversation("space", [Message(USER, "Hi"), Message(ASSISTANT, "Yo")], " Lead."),
            Conversation("nl", [Message(USER, "\nHi\n"), Message(ASSISTANT, "\n\nYo \n")], "\n"),
            Conversation(
                "tool",
                [
                    Message(USER, "Weather?"),
                    Message(ASSISTANT, '{"call": 1}'),
                    Message(TOOL, '{"t": 20}'),
                    Message(ASSISTANT, "20 C."),
                ],
            ),
        ]
        assert compare(convs, ours, theirs)["conversations"] == len(convs)
        empty = [{"role": SYSTEM, "content": ""}, {"role": USER, "content": "Hi"}]
        assert theirs.apply_chat_template(empty, add_generation_prompt=True)["input_ids"] == (
            ours.encode_prompt(Conversation("e", [Message(USER, "Hi")]))
        )
        late_system = [{"role": USER, "content": "Hi"}, {"role": SYSTEM, "content": "x"}]
        with pytest.raises(Exception, match="system message only first"):
            theirs.apply_chat_template(late_system)


@pytest.mark.parametrize("flavour", ["llama", "chatml"])
def test_typed_special_tokens(flavour, tokenizers, tmp_path):
    """The one known difference, in no conversation of the shared data: training encodes a
    special token's spelling in message text as characters; apply_chat_template tokenizes the
    rendered string, so it is the token there (as in every chat template). Its
    sanitize_control_tokens=True keeps the characters, but tokenizes the text around them
    apart, so the ids may still differ from training's."""
    tok, _ = tokenizers[flavour]
    theirs, _ = exported(tok.name_or_path, "vicuna_v1.1", tmp_path)
    ours = ConversationTokenizer(AutoTokenizer.from_pretrained(tok.name_or_path), "vicuna_v1.1")
    typed = tok.eos_token
    conv = Conversation("typed", [Message(USER, f"say {typed} now"), Message(ASSISTANT, "ok")])
    assert spells_special_token(conv, theirs)
    want = ours.encode(conv).input_ids
    got = theirs.apply_chat_template(as_messages(conv), tokenize=True)["input_ids"]
    assert want.count(tok.eos_token_id) == 1 and got.count(tok.eos_token_id) == 2
    assert theirs.decode(got) == theirs.decode(want)  # the same text


def test_the_chat_template_is_readable_and_names_its_template(llama_dir, tmp_path):
    theirs, record = exported(llama_dir, "vicuna_v1.1", tmp_path)
    text = (tmp_path / "export" / "chat_template.jinja").read_text()
    assert text == theirs.chat_template
    assert '"name": "vicuna_v1.1"' in text and '"sep2": "{eos}"' in text
    assert '{%- set sep2 = "</s>" %}' in text and '{%- set bos = "<s>" %}' in text
    assert record == {
        "chat_template": True,
        "stop": {"token_ids": [theirs.eos_token_id], "tokens": ["</s>"], "text": ""},
    }
    prompt = [{"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": "Hello!"}]
    assert theirs.apply_chat_template(prompt, tokenize=False) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: "
        "Hello!</s>"
    )


def test_camelid_reads_its_own_chat_template_back(llama_dir, chatml_dir, custom_yaml, tmp_path):
    """`chat_template` on an export is the template it was made from (training's exact masks,
    not the generic ChatTemplate's); an edited one or another tool's is used as it is."""
    theirs, _ = exported(llama_dir, "alpaca", tmp_path / "a")
    assert get_template(CHAT_TEMPLATE, theirs) is get_template("alpaca")
    custom, _ = exported(llama_dir, custom_yaml, tmp_path / "c")
    assert get_template(CHAT_TEMPLATE, custom) == get_template(custom_yaml)
    theirs.chat_template = theirs.chat_template.replace("': '", "':  '")  # edited after export
    assert isinstance(get_template(CHAT_TEMPLATE, theirs), ChatTemplate)
    chatml = AutoTokenizer.from_pretrained(chatml_dir)
    kept, record = exported(chatml_dir, CHAT_TEMPLATE, tmp_path / "m")
    assert kept.chat_template == chatml.chat_template == jinja_chat_template(CHAT_TEMPLATE, chatml)
    assert record["stop"]["tokens"] == ["<|im_end|>"]


def test_what_ends_a_reply(llama_dir, chatml_dir):
    llama, chatml = (AutoTokenizer.from_pretrained(d) for d in (llama_dir, chatml_dir))
    assert reply_end("vicuna_v1.1", llama) == (["</s>"], "")
    assert reply_end(CHAT_TEMPLATE, chatml) == (["<|im_end|>"], "")
    assert reply_end({"sep2": "<|endoftext|>"}, chatml) == (["<|endoftext|>"], "")
    # a reply that ends in plain text: no stop token, the text is the stop
    assert reply_end({"sep2": "\n\n"}, llama) == ([], "\n\n")
    assert isinstance(get_template({"sep2": "\n\n"}), SeparatorTemplate)


def test_trained_template_reads_the_tokenizer_first(llama_dir, chatml_dir, custom_yaml, tmp_path):
    def folder(name, tokenizer_dir, template=None, info=None):
        out = tmp_path / name
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if template:
            save_for_inference(tok, template, out)
        else:
            tok.save_pretrained(out)
        if info is not None:
            (out / "camelid.json").write_text(json.dumps(info))
        return out

    new = folder(
        "new", llama_dir, "qlora_oasst", {"template": "qlora_oasst", "chat_template": True}
    )
    assert trained_template(new) == "qlora_oasst"
    fields = trained_template(folder("custom", llama_dir, custom_yaml, {"chat_template": True}))
    assert get_template(fields) == get_template(custom_yaml)
    # an export from before chat templates: the tokenizer's (the base's ChatML) is not the one
    # it was trained with; camelid.json is
    old = folder("old", chatml_dir, None, {"template": "alpaca"})
    assert trained_template(old) == "alpaca"
    assert trained_template(folder("foreign", chatml_dir)) == CHAT_TEMPLATE  # another tool's model
    assert trained_template(folder("bare", llama_dir), default="vicuna_v1.1") == "vicuna_v1.1"
    assert trained_template(None, new) == "qlora_oasst"  # chat: no adapter, the model's


GENERATE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, messages = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
new = out[0, inputs["input_ids"].shape[1]:].tolist()
print(json.dumps({"prompt": inputs["input_ids"][0].tolist(), "new": new,
                  "eos": model.generation_config.eos_token_id,
                  "text": tok.decode(new, skip_special_tokens=True)}))
"""


def rig_to_answer(folder: Path, answer: list[int], stop: int) -> None:
    """Rewrite the exported weights into a lookup table: every layer adds nothing, and the
    head maps the prompt's last token to answer[0], each answer token to the next, the last
    to `stop`, and `stop` to answer[0] again. A model that ignores the stop token would go on."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0  # any other token (the prompt's last): row 0 of the table
        head.zero_()
        chain = [*answer, stop]
        for i, tok in enumerate(chain):
            emb[tok] = 0.0
            emb[tok, i + 1] = 1.0
        for i, tok in enumerate(chain):  # row i -> chain[i]; the stop's row -> answer[0]
            head[tok, i] = 10.0
        head[answer[0], len(chain)] = 10.0
    model.save_pretrained(folder, safe_serialization=True)


@pytest.mark.parametrize("flavour", [pytest.param("llama", marks=pytest.mark.slow), "chatml"])
def test_full_export_loads_and_stops_with_plain_transformers(
    flavour, tokenizers, data_dir, tmp_path
):
    """The recipe's own export (1 step), loaded by a script that imports no camelid: its chat
    template gives training's prompt ids, and generate() stops at the template's stop token
    because generation_config.json names it. Llama with qlora_oasst: the stop is `</s>`, the
    tokenizer's eos. ChatML with a template whose replies end in `<|endoftext|>`: not the
    model's eos (`<|im_end|>`), so only the export's generation_config can stop there."""
    tok, _ = tokenizers[flavour]
    template = "qlora_oasst"
    if flavour == "chatml":
        template = tmp_path / "endoftext.yaml"
        template.write_text('name: endoftext\nsep2: "<|endoftext|>"\n')
    out = tmp_path / "run"
    train(
        "single",
        1,
        out,
        *flags(
            config="tiny_cpu.yaml",
            model_name_or_path=tok.name_or_path,
            data_path=data_dir / "fastchat_dummy_conversation.json",
            max_steps=1,
            save_steps=100,
            template=template,
        ),
    )
    model = out / "model"
    info = json.loads((model / "camelid.json").read_text())
    assert info["chat_template"] is True
    exported_tok = AutoTokenizer.from_pretrained(model)
    stop = exported_tok.convert_tokens_to_ids("</s>" if flavour == "llama" else "<|endoftext|>")
    eos = json.loads((model / "generation_config.json").read_text())["eos_token_id"]
    assert eos == (stop if flavour == "llama" else [stop, tok.eos_token_id])
    answer = exported_tok("Paris is the capital", add_special_tokens=False)["input_ids"]
    rig_to_answer(model, answer, stop)
    messages = [{"role": USER, "content": "What is the capital of France?"}]
    res = subprocess.run(
        [sys.executable, "-c", GENERATE, str(model), json.dumps(messages)],
        capture_output=True,
        text=True,
        env=env(),
        cwd="/",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.splitlines()[-1])
    ours = ConversationTokenizer(tok, str(template))
    assert got["prompt"] == ours.encode_prompt(
        Conversation("q", [Message(USER, messages[0]["content"])])
    )
    assert got["new"] == [*answer, stop]  # stopped there, with 12 new tokens allowed
    assert got["text"] == "Paris is the capital" and got["eos"] == eos
    # the recipes read the same template back from the export
    assert get_template(trained_template(model)) == get_template(str(template))


def test_adapter_export_and_merge_carry_the_template(llama_dir, data_dir, tmp_path):
    """QLoRA's adapter export (1 step) writes the template into the adapter's tokenizer;
    recipes.merge writes it into the merged model's, with generation_config's stop token, from
    the adapter's chat template (or, for an adapter exported before, from its camelid.json)."""
    from recipes.merge import merge

    out = tmp_path / "qlora"
    train(
        "ddp",
        1,
        out,
        *flags(
            config="qlora_tiny_cpu.yaml",
            model_name_or_path=llama_dir,
            data_path=data_dir / "fastchat_dummy_conversation.json",
            max_steps=1,
            save_steps=100,
            template="alpaca",
        ),
        recipe=QLORA,
    )
    adapter = out / "adapter"
    assert get_template(CHAT_TEMPLATE, AutoTokenizer.from_pretrained(adapter)) is get_template(
        "alpaca"
    )
    assert json.loads((adapter / "camelid.json").read_text())["chat_template"] is True
    assert trained_template(adapter, llama_dir) == "alpaca"
    merged = merge(str(adapter), str(tmp_path / "merged"))
    tok = AutoTokenizer.from_pretrained(merged)
    assert get_template(CHAT_TEMPLATE, tok) is get_template("alpaca")
    assert (
        json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
        == tok.eos_token_id
    )
    assert json.loads((merged / "camelid.json").read_text())["template"] == "alpaca"
    # an adapter exported before chat templates: its tokenizer has none, camelid.json names it
    (adapter / "chat_template.jinja").unlink()
    info = json.loads((adapter / "camelid.json").read_text())
    info.pop("chat_template")
    (adapter / "camelid.json").write_text(json.dumps({**info, "template": "qlora_oasst"}))
    older = merge(str(adapter), str(tmp_path / "merged-older"))
    assert get_template(CHAT_TEMPLATE, AutoTokenizer.from_pretrained(older)) is get_template(
        "qlora_oasst"
    )
    assert trained_template(older) == "qlora_oasst"
