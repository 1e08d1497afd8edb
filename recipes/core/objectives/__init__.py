"""The objective registry: each objective is one module (see base.py for the contract) and one
entry below. A recipe names its objective; the loop asks the objective for its training
units, its loss and anything to prepare before resuming."""

from __future__ import annotations

from . import dpo, grpo, reward, sft
from .base import Objective

OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    OBJECTIVES[objective.name] = objective
    return objective


def get(name: str) -> Objective:
    from ..config import ConfigError

    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}") from None


for module in (sft, dpo, reward, grpo):
    register(module.OBJECTIVE)
