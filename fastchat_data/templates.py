"""Conversation templates: a conversation -> a list of Segments.

A Segment is template text (`literal`: special-token strings in it are special tokens) or
message text (never special, whatever it contains). `trainable` marks what the loss is taken
on: each assistant reply and the end token that closes it.

Two kinds:
- SeparatorTemplate: FastChat's "add colon two" style (Vicuna v1.1 and kin), rendered exactly
  as FastChat's `Conversation.get_prompt` renders it. A new one is a few lines in TEMPLATES.
- ChatTemplate: the tokenizer's own Jinja chat template through `apply_chat_template`, so
  current models (ChatML, Llama-3, Qwen, ...) train with the format they were built for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from .schema import ASSISTANT, SYSTEM, TOOL, USER, Conversation, DataError, SkipRecord

EOS = "{eos}"  # in a SeparatorTemplate: the tokenizer's own end-of-sequence token


class Segment(NamedTuple):  # a NamedTuple: built per segment per conversation, so it must be cheap
    text: str
    literal: bool = False
    trainable: bool = False


@dataclass(frozen=True)
class SeparatorTemplate:
    """`system sep ROLE: text sep ROLE: text sep2 ...` (FastChat's SeparatorStyle.ADD_COLON_TWO)."""

    name: str
    system: str
    user: str
    assistant: str
    sep: str
    sep2: str
    tool: str = "TOOL"
    add_bos: bool = (
        True  # the tokenizer's own leading special tokens, as `tokenizer(text)` adds them
    )

    def render(self, conv: Conversation, eos: str) -> list[Segment]:
        sep2 = self.sep2.replace(EOS, eos)
        # A system prompt from the data is message text: "</s>" in it is characters, never the
        # end token. The template's own system prompt is template text.
        if conv.system:
            out = [Segment(conv.system), Segment(self.sep, literal=True)]
        else:
            out = [Segment(self.system + self.sep, literal=True)]
        names = {USER: self.user, TOOL: self.tool, ASSISTANT: self.assistant}
        for m in conv.messages:
            if m.role == ASSISTANT:
                # FastChat renders "ASSISTANT: reply</s>"; the space after the colon goes with the
                # reply, as in FastChat's masks (a token "▁reply" covers it).
                out.append(Segment(self.assistant + ":", literal=True))
                out.append(Segment(" " + m.content, trainable=True))
                out.append(Segment(sep2, literal=True, trainable=True))
            else:
                out.append(Segment(names[m.role] + ": ", literal=True))
                out.append(Segment(m.content))
                out.append(Segment(self.sep, literal=True))
        return out

    def prompt(self, conv: Conversation, eos: str) -> str:
        """The whole text, as FastChat's get_prompt() gives it."""
        return "".join(s.text for s in self.render(conv, eos))

    def generation_prompt(self, conv: Conversation, eos: str) -> list[Segment]:
        """Segments for inference: the conversation so far, then the assistant tag."""
        return self.render(conv, eos) + [Segment(self.assistant + ":", literal=True)]


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES: dict[str, SeparatorTemplate] = {
    t.name: t
    for t in [
        SeparatorTemplate("vicuna_v1.1", VICUNA_SYSTEM, "USER", "ASSISTANT", sep=" ", sep2=EOS),
        SeparatorTemplate(
            "alpaca",
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
            "### Instruction", "### Response", sep="\n\n", sep2=EOS,
        ),
        SeparatorTemplate(
            "qlora_oasst",
            "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
            "### Human", "### Assistant", sep="\n", sep2=EOS,
        ),
    ]
}  # fmt: skip

CHAT_TEMPLATE = "chat_template"
_SENTINEL = "\ue000camelid-message-{}\ue001"  # private-use characters: never in real text


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's Jinja chat template. Message text is located by rendering the
    conversation once with sentinels in place of each message, so template text that happens
    to equal a message (a message "user", say) can never be mistaken for it."""

    tokenizer: object
    name: str = CHAT_TEMPLATE

    def _messages(self, conv: Conversation, contents: list[str]) -> list[dict]:
        msgs = [{"role": SYSTEM, "content": contents[0]}] if conv.system else []
        offset = len(msgs)
        msgs += [
            {"role": m.role, "content": contents[offset + i]} for i, m in enumerate(conv.messages)
        ]
        return msgs

    def _apply(self, msgs: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja raises its own errors (e.g. "roles must alternate")
            raise SkipRecord("chat_template_error", f"{type(e).__name__}: {e}") from None

    def _render(self, conv: Conversation, add_generation_prompt: bool) -> list[Segment]:
        real = ([conv.system] if conv.system else []) + [m.content for m in conv.messages]
        roles = ([SYSTEM] if conv.system else []) + [m.role for m in conv.messages]
        marked = self._apply(
            self._messages(conv, [_SENTINEL.format(i) for i in range(len(real))]),
            add_generation_prompt,
        )
        segments, cursor = [], 0
        for i, (role, text) in enumerate(zip(roles, real)):
            tag = _SENTINEL.format(i)
            pos = marked.find(tag, cursor)
            if pos < 0:
                raise SkipRecord(
                    "template_dropped_message", f"the chat template does not render message {i}"
                )
            segments.append(Segment(marked[cursor:pos], literal=True))
            segments.append(Segment(text, trainable=role == ASSISTANT))
            cursor = pos + len(tag)
        segments.append(Segment(marked[cursor:], literal=True))
        segments = self._train_end_tokens(segments)
        # Templates may transform text (e.g. `| trim`): then the sentinel layout is not the real
        # rendering, and training on it would teach a format the model never sees at inference.
        if "".join(s.text for s in segments) != self._apply(
            self._messages(conv, real), add_generation_prompt
        ):
            raise SkipRecord(
                "template_alters_content", "the chat template changes message text (e.g. trims it)"
            )
        return segments

    def _train_end_tokens(self, segments: list[Segment]) -> list[Segment]:
        """The special token that closes an assistant reply (`<|im_end|>`, `<|eot_id|>`, `</s>`),
        with any whitespace before it, is trained: the model must learn to stop."""
        end = re.compile(r"\s*(?:" + "|".join(map(re.escape, special_tokens(self.tokenizer))) + ")")
        out = []
        for prev, seg in zip([None, *segments], segments):
            m = end.match(seg.text) if prev is not None and prev.trainable and seg.literal else None
            if m:
                out += [
                    Segment(m.group(), literal=True, trainable=True),
                    Segment(seg.text[m.end() :], literal=True),
                ]
            else:
                out.append(seg)
        return [s for s in out if s.text]

    def render(self, conv: Conversation, eos: str) -> list[Segment]:
        return self._render(conv, add_generation_prompt=False)

    def generation_prompt(self, conv: Conversation, eos: str) -> list[Segment]:
        return self._render(conv, add_generation_prompt=True)


def special_tokens(tokenizer) -> list[str]:
    """Every special token string of `tokenizer`, longest first (for matching in template text)."""
    names = set(tokenizer.all_special_tokens)
    names |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted((n for n in names if n), key=len, reverse=True)


def custom_template(spec: dict, where: str = "--template") -> SeparatorTemplate:
    """A SeparatorTemplate from a recipe's own fields, e.g. a system text of its own:
    {"system": "...", "user": "USER", "assistant": "ASSISTANT", "sep": " ", "sep2": "{eos}"}."""
    known = {f for f in SeparatorTemplate.__dataclass_fields__ if f != "name"}
    unknown = set(spec) - known - {"name"}
    if unknown:
        raise DataError(
            where, "template", f"unknown template keys {sorted(unknown)}; known: {sorted(known)}"
        )
    base = TEMPLATES["vicuna_v1.1"]
    fields = {k: spec.get(k, getattr(base, k)) for k in known}
    for k, v in fields.items():
        want = type(getattr(base, k))
        if type(v) is not want:
            raise DataError(where, f"template key {k!r}", f"expects a {want.__name__}, got {v!r}")
    return SeparatorTemplate(name=str(spec.get("name", "custom")), **fields)


def get_template(name, tokenizer=None):
    """A template by name, a dict of SeparatorTemplate fields, or a .yaml / .json file of one."""
    if isinstance(name, dict):
        return custom_template(name)
    if isinstance(name, str) and name.endswith((".yaml", ".yml", ".json")):
        from pathlib import Path

        import yaml  # JSON is YAML too

        path = Path(name)
        if not path.is_file():
            why = "is a directory, not a template file" if path.is_dir() else "does not exist"
            raise DataError(name, "template file", why)
        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(name, "template file", f"cannot be read: {reason}") from None
        if not isinstance(spec, dict | None):
            raise DataError(name, "template file", f"holds a {type(spec).__name__}, not fields")
        return custom_template(spec or {}, where=name)
    if name == CHAT_TEMPLATE:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "--template", CHAT_TEMPLATE, "the tokenizer has no chat template; name a template"
            )
        return ChatTemplate(tokenizer)
    if name not in TEMPLATES:
        choices = ", ".join([*TEMPLATES, CHAT_TEMPLATE])
        raise DataError(
            "--template", repr(name), f"unknown template; choose from {choices} or a YAML file"
        )
    return TEMPLATES[name]


def check_template_name(name) -> None:
    """Fail on an unknown template name before a tokenizer is loaded (which takes seconds);
    `chat_template` and templates given as fields or files are checked when used."""
    if isinstance(name, str) and name != CHAT_TEMPLATE:
        get_template(name)


def portable_template(spec):
    """`spec` in a form that needs no file: a built-in name as is, a custom template (a dict or
    a YAML/JSON file) as its fields. Written beside exported models for chat and eval."""
    if isinstance(spec, str) and (spec in TEMPLATES or spec == CHAT_TEMPLATE):
        return spec
    import dataclasses

    return dataclasses.asdict(get_template(spec))
