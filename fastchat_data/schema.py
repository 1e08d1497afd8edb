"""The one in-memory form every reader produces and every writer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

from .options import InputError

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"


class DataError(InputError):
    """Bad input that stops a command: names the file, the record and what is wrong (the
    command line's error boundary prints it as one line and exits 2)."""

    def __init__(self, path: str, where: str, reason: str):
        self.path, self.where, self.reason = str(path), where, reason
        super().__init__(f"{path}: {where}: {reason}")


def check_count(
    flag: str,
    value,
    minimum: int = 1,
    *,
    allow_none: bool = False,
    maximum: int | None = None,
    why_not_more: str = "",
) -> None:
    """A DataError unless `value` (a command's option) is a whole number >= `minimum` and, where
    a `maximum` is given, <= it (`why_not_more` says why in the error)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(flag, "value", f"expects a whole number >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise DataError(flag, "value", f"{value:,} is over {maximum:,}: {why_not_more}")


class SkipRecord(ValueError):
    """A record that is skipped and counted under `reason` (or, with --strict, raised)."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class Message:
    role: str
    content: str


@dataclass
class Conversation:
    """A system prompt (possibly empty) and turns alternating user -> assistant.

    A `tool` turn (a function's output) stands on the user side of the alternation;
    an assistant turn may hold a function call.
    """

    id: str
    messages: list[Message]
    system: str = ""
    extra: dict = field(default_factory=dict)
    # what the reader changed on the way in ("'tools' -> system prompt text"): reports count it
    converted: set[str] = field(default_factory=set, compare=False, repr=False)

    def pairs(self) -> list[tuple[Message, Message]]:
        return [
            (self.messages[i], self.messages[i + 1]) for i in range(0, len(self.messages) - 1, 2)
        ]


def validate(conv: Conversation) -> Conversation:
    """Raise SkipRecord unless `conv` is trainable: non-empty strings, user/assistant
    alternation."""
    if not conv.messages:
        raise SkipRecord("no_turns")
    for i, m in enumerate(conv.messages):
        if m.role not in (USER, ASSISTANT, TOOL):
            raise SkipRecord("unknown_role", f"turn {i} has role {m.role!r}")
        if not isinstance(m.content, str):
            raise SkipRecord("non_string_value", f"turn {i} holds {type(m.content).__name__}")
        if not m.content.strip():
            raise SkipRecord("empty_value", f"turn {i} ({m.role}) is empty")
        user_side = i % 2 == 0
        if (m.role == ASSISTANT) == user_side:
            want = "user" if user_side else "assistant"
            raise SkipRecord("broken_alternation", f"turn {i} is {m.role}, expected {want}")
    if conv.messages[-1].role != ASSISTANT:
        raise SkipRecord("no_final_assistant_turn", "the last turn is not an assistant reply")
    if not isinstance(conv.system, str):
        raise SkipRecord("non_string_value", "system prompt is not a string")
    return conv
