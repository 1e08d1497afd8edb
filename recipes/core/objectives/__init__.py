"""The objective registry: each objective is one module (see base.py for the contract) and one
entry below. A recipe names its objective; the loop asks the objective for its training
units, its loss and anything to prepare before resuming."""

from __future__ import annotations

from ..config import ConfigError
from . import dpo, grpo, reward, sft
from .base import Objective, Units

OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add `objective`; one without its `units` declaration is refused here, at import, rather
    than when a config is checked."""
    if not isinstance(getattr(objective, "units", None), Units):
        raise TypeError(
            f"objective {objective.name!r}: declare `units = Units(...)` (objectives/base.py): "
            "what it trains on, and whether those units pack and split"
        )
    OBJECTIVES[objective.name] = objective
    return objective


def get(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}") from None


def refuse_unsupported(objective: Objective, cfg) -> None:
    """A check of every recipe's config: --packing, and --sequence_parallel_size > 1, only for
    an objective whose units (base.Units) can take them, in one line naming those that can."""

    def able(capability: str) -> str:
        found = [o.name for o in OBJECTIVES.values() if getattr(o.units, capability)]
        return f"{', '.join(found) or 'none'} {'does' if len(found) == 1 else 'do'}"

    units, sp = objective.units, cfg.sequence_parallel_size
    if cfg.packing and not units.packs:
        raise ConfigError(
            f"--packing: the {objective.name} objective does not pack its {units.noun} "
            f"several to a row ({able('packs')}); use --packing False"
        )
    if sp > 1 and not units.splits:
        raise ConfigError(
            f"--sequence_parallel_size {sp}: the {objective.name} objective does not train on "
            f"split sequences ({able('splits')}); use --sequence_parallel_size 1"
        )


for module in (sft, dpo, reward, grpo):
    register(module.OBJECTIVE)
