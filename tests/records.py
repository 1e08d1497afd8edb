"""ShareGPT records for the data tests, one line each instead of a nest of dicts."""

from __future__ import annotations


def sharegpt(*turns: object, **extra: object) -> dict:
    """A record whose `turns` alternate human and gpt, from the human; `extra` fields first."""
    names = ["human", "gpt"]
    return {
        **extra,
        "conversations": [{"from": names[i % 2], "value": t} for i, t in enumerate(turns)],
    }


def sharegpt_turns(*turns: tuple[str, object], **extra: object) -> dict:
    """A record of (from, value) `turns` with any roles (tool calls, bad roles, a reply
    first); `extra` fields after the conversation."""
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


# a Glaive function-calling conversation: a call, its observation, and the reply
GLAIVE_TURNS = (
    ("human", "Weather in Paris?"),
    ("function_call", '{"name": "weather"}'),
    ("observation", "sunny"),
    ("gpt", "Sunny."),
)
