"""Arithmetic word problems generated from a seed, with exact-answer and format rewards: a task
whose rewards a program can check, so GRPO runs and is measured offline.

    python -m recipes.core.rewards.arithmetic --out prompts.json [--n 256] [--seed 0]
    R=recipes.core.rewards.arithmetic
    python recipes/grpo.py --data_path prompts.json --reward_funcs $R:correct,$R:format ...

Each record is {"prompt": ..., "answer": "17"}; the rewards read the `answer` column.
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass

from fastchat_data.options import entry_point, option, parse

STORIES = [
    ("{name} has {a} apples and buys {b} more. How many apples does {name} have?", "+"),
    ("{name} has {a} apples and gives away {b}. How many apples are left?", "-"),
    ("A box holds {a} pens. {name} adds {b} pens. How many pens are in the box?", "+"),
    ("A bus carries {a} people. {b} get off. How many people are on the bus?", "-"),
]
NAMES = ["Tom", "Ann", "Sam", "Mia", "Leo", "Zoe"]
NUMBER = re.compile(r"-?\d+")


def problems(n: int, seed: int = 0) -> list[dict]:
    """`n` problems with answers from 0 to 40 (subtractions never go below zero)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        story, op = rng.choice(STORIES)
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        if op == "-" and b > a:
            a, b = b, a
        answer = a + b if op == "+" else a - b
        prompt = story.format(name=rng.choice(NAMES), a=a, b=b) + " Answer with the number."
        out.append({"prompt": prompt, "answer": str(answer)})
    return out


def correct(prompts, completions, answer, **_) -> list[float]:
    """1 when the completion's first number is the answer, else 0."""
    rewards = []
    for text, expected in zip(completions, answer):
        found = NUMBER.search(text)
        rewards.append(1.0 if found and found.group() == str(expected) else 0.0)
    return rewards


def close(prompts, completions, answer, **_) -> list[float]:
    """Partial credit: 1 / (1 + |first number - answer|), 0 without a number (a denser signal
    than `correct` for a model that rarely gets the answer)."""
    rewards = []
    for text, expected in zip(completions, answer):
        found = NUMBER.search(text)
        rewards.append(1 / (1 + abs(int(found.group()) - int(expected))) if found else 0.0)
    return rewards


def format(prompts, completions, **_) -> list[float]:  # noqa: A001  (the reward's name)
    """1 when the completion is a number and nothing else, else 0."""
    return [1.0 if re.fullmatch(r"\s*-?\d+\s*", text) else 0.0 for text in completions]


@dataclass
class Options:
    """Write arithmetic word problems (prompt, answer) as a GRPO prompt file."""

    out: str = option(help="the JSON file to write")
    n: int = option(256, "how many problems")
    seed: int = option(0, "the seed that draws them")


@entry_point
def main(argv: list[str] | None = None) -> int:
    a = parse(Options, argv, prog="python -m recipes.core.rewards.arithmetic", description=__doc__)
    with open(a.out, "w") as f:
        json.dump(problems(a.n, a.seed), f, indent=1)
    print(f"written: {a.out} ({a.n} problems)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
