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

import functools
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
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.",
            "### Instruction",
            "### Response",
            sep="\n\n",
            sep2=EOS,
        ),
        SeparatorTemplate(
            "qlora_oasst",
            "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
            "### Human",
            "### Assistant",
            sep="\n",
            sep2=EOS,
        ),
    ]
}

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

    @functools.cached_property
    def _end_token(self) -> re.Pattern:
        """An end token with the whitespace before it (built once: the special tokens are
        read off the tokenizer, a per-conversation cost otherwise)."""
        return re.compile(
            r"\s*(?:" + "|".join(map(re.escape, special_tokens(self.tokenizer))) + ")"
        )

    def _train_end_tokens(self, segments: list[Segment]) -> list[Segment]:
        """The special token that closes an assistant reply (`<|im_end|>`, `<|eot_id|>`, `</s>`),
        with any whitespace before it, is trained: the model must learn to stop."""
        end = self._end_token
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
        # A chat template camelid wrote at export: its own template, which renders the same
        # text and keeps training's exact masks (the reply's leading space is trained).
        return template_from_chat_template(tokenizer) or ChatTemplate(tokenizer)
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


# -- the template as a Jinja chat template, for the exported tokenizer --------------------------

_JINJA_FIELDS = re.compile(r"^\{%- set camelid = (\{.*\}) %\}$", re.MULTILINE)
_JINJA_BODY = """{#- camelid: the template this model was trained with, rendered exactly as training
    rendered it.
    `camelid` holds the template's fields as training used them (fastchat_data/templates.py). -#}
{%- set camelid = FIELDS %}
{%- set bos = PREFIX %}
{%- set sep2 = SEP2 %}
{%- set bos_space = BOS_SPACE %}
{%- set text %}
{%- if messages and messages[0]['role'] == 'system' and messages[0]['content'] %}
    {{- messages[0]['content'] + camelid['sep'] }}
{%- else %}
    {{- camelid['system'] + camelid['sep'] }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- camelid['user'] + ': ' + message['content'] + camelid['sep'] }}
    {%- elif message['role'] == 'tool' %}
        {{- camelid['tool'] + ': ' + message['content'] + camelid['sep'] }}
    {%- elif message['role'] == 'assistant' %}
        {{- camelid['assistant'] + ': ' + message['content'] + sep2 }}
    {%- elif not (message['role'] == 'system' and loop.first) %}
        {{- raise_exception('camelid templates take a system message only first, then user, '
            ~ 'assistant and tool messages; got ' ~ message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- camelid['assistant'] + ':' }}
{%- endif %}
{%- endset %}
{#- bos_space: this tokenizer starts a text with "▁" unless it follows a special token, as
    training's text did: the space stands for it -#}
{{- bos + (' ' if bos_space and text[:1] not in [' ', '▁'] else '') + text }}"""


def _jinja_literal(value) -> str:
    """`value` (str, bool, or a dict of them) as a Jinja literal. Strings are double-quoted with
    backslash escapes for quotes, backslashes and unprintable characters only, so they read as
    written in any Jinja (Python's, minijinja, jinja.js)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{_jinja_literal(k)}: {_jinja_literal(v)}" for k, v in value.items())
            + "}"
        )
    named = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for c in value:
        if c in named:
            out.append(named[c])
        elif not c.isprintable():
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def leading_special_tokens(tokenizer) -> str:
    """The special tokens `tokenizer(text)` puts before the text (BOS), as one string: what
    ConversationTokenizer puts first when a template has add_bos."""
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    n = len(full) - len(bare)
    if n <= 0 or list(full[n:]) != list(bare):
        return ""
    return "".join(tokenizer.convert_ids_to_tokens(list(full[:n])))


def jinja_chat_template(template, tokenizer) -> str:
    """The chat template (Jinja, as `tokenizer.chat_template` holds it) that renders what
    `template` renders: with `apply_chat_template(messages, tokenize=True)` the same ids as
    ConversationTokenizer's for a conversation, and with `add_generation_prompt=True` the same
    as its encode_prompt. A `chat_template` template is the tokenizer's own, kept as it is.

    Messages are [{"role", "content"}]: an optional first system message (its text replaces the
    template's system prompt; empty, it does not), then user / assistant / tool messages. The
    end-of-sequence and BOS strings of `tokenizer` are written into the template, as training
    put them (a `{eos}` in sep2 is the tokenizer's eos token)."""
    if isinstance(template, str | dict):
        template = get_template(template, tokenizer)
    if isinstance(template, ChatTemplate):
        return template.tokenizer.chat_template
    if not isinstance(template, SeparatorTemplate):
        raise TypeError(f"not a camelid template: {template!r}")
    if EOS in template.sep2 and not tokenizer.eos_token:
        raise DataError(
            "--template", template.name, "sep2 holds {eos} but the tokenizer has no eos token"
        )
    fields = {"name": template.name}
    fields.update(
        (f, getattr(template, f)) for f in SeparatorTemplate.__dataclass_fields__ if f != "name"
    )
    prefix = leading_special_tokens(tokenizer) if template.add_bos else ""
    values = {
        "FIELDS": fields,
        "PREFIX": prefix,
        "BOS_SPACE": _space_after(prefix, tokenizer),
        "SEP2": template.sep2.replace(EOS, tokenizer.eos_token or ""),
    }
    # one pass, so a field's text that reads "SEP2" is never replaced itself
    return re.sub(
        "FIELDS|PREFIX|BOS_SPACE|SEP2", lambda m: _jinja_literal(values[m.group()]), _JINJA_BODY
    )


def _space_after(prefix: str, tokenizer) -> bool:
    """Whether text rendered after `prefix` (BOS) needs a space to tokenize as training did.

    Training tokenizes the text as `tokenizer(text)` does, BOS added by the tokenizer, so the
    text's start is the start of a string: a SentencePiece tokenizer with Metaspace
    prepend_scheme "first" (Llama, legacy=False) prepends "▁" there. A chat template renders
    BOS as text, and after a special token that tokenizer prepends nothing: a space in its
    place gives the same "▁"."""
    if not prefix:
        return False
    probes = ["x", "Hello world", "A chat"]
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]

    def same(sep: str) -> bool:
        return all(
            tokenizer(prefix + sep + t, add_special_tokens=False)["input_ids"]
            == ids + tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in probes
        )

    return not same("") and same(" ")


def template_from_chat_template(tokenizer) -> SeparatorTemplate | None:
    """The camelid template that `tokenizer.chat_template` was generated from, or None: a chat
    template that camelid did not write, or one edited since (it is then used as it is)."""
    text = getattr(tokenizer, "chat_template", None)
    m = _JINJA_FIELDS.search(text) if isinstance(text, str) else None
    if not m:
        return None
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        fields = ImmutableSandboxedEnvironment().from_string(m.group(0)).module.camelid
        template = custom_template(dict(fields), where="the tokenizer's chat template")
    except (TemplateError, DataError, AttributeError, TypeError):
        return None
    template = (
        TEMPLATES.get(template.name) if TEMPLATES.get(template.name) == template else template
    )
    return template if jinja_chat_template(template, tokenizer) == text else None


def reply_end(template, tokenizer) -> tuple[list[str], str]:
    """What ends an assistant reply in `template`: the special tokens training taught the model
    to emit there (`</s>` for vicuna_v1.1: its sep2 is `{eos}`; `<|im_end|>` for ChatML), or,
    for a template whose reply ends with plain text (a sep2 of "\\n\\n"), that text."""
    if isinstance(template, str | dict):
        template = get_template(template, tokenizer)
    from .schema import Message

    probe = Conversation("probe", [Message(USER, "x"), Message(ASSISTANT, "y")])
    try:
        segments = template.render(probe, tokenizer.eos_token)
    except SkipRecord:  # a chat template that refuses the probe: nothing to learn from it
        return [], ""
    end = "".join(s.text for s in segments if s.literal and s.trainable)
    names = special_tokens(tokenizer)
    found = re.findall("|".join(map(re.escape, names)), end) if names else []
    return found, ("" if found else end)


def portable_template(spec):
    """`spec` in a form that needs no file: a built-in name as is, a custom template (a dict or
    a YAML/JSON file) as its fields. Written beside exported models for chat and eval."""
    if isinstance(spec, str) and (spec in TEMPLATES or spec == CHAT_TEMPLATE):
        return spec
    import dataclasses

    return dataclasses.asdict(get_template(spec))
