"""Reward functions for GRPO, named on the command line as `module:function` (comma-separated).

A reward function takes TRL's arguments, `f(prompts, completions, **columns)`: the prompt of
each completion (a string, repeated for the group), the completions (decoded text), and every
other column of the prompt file as a list aligned with them (an `answer` column arrives as
`answer=[...]`). It returns one float per completion. recipes/core/rewards/arithmetic.py ships
two, for prompts it generates itself, so a GRPO run needs nothing from the network.
"""

from __future__ import annotations

import importlib

from ..config import ConfigError


def load_reward_funcs(spec: str) -> list[tuple[str, object]]:
    """The functions `spec` names ("pkg.module:function,..."), with their names for the log."""
    funcs = []
    for item in [s.strip() for s in (spec or "").split(",") if s.strip()]:
        module_name, _, attr = item.partition(":")
        if not attr:
            raise ConfigError(
                f"--reward_funcs {item!r}: name a function as module:function, e.g. "
                "recipes.core.rewards.arithmetic:correct"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(
                f"--reward_funcs {item!r}: cannot import {module_name} ({e})"
            ) from None
        func = getattr(module, attr, None)
        if not callable(func):
            raise ConfigError(f"--reward_funcs {item!r}: {module_name} has no function {attr}")
        funcs.append((attr, func))
    if not funcs:
        raise ConfigError(
            "--reward_funcs: name at least one reward function (module:function), e.g. "
            "recipes.core.rewards.arithmetic:correct"
        )
    return funcs
