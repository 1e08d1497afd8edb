"""`python -m fastchat_data <command> --help` (or `camelid-data`): the data tools on fire."""

from __future__ import annotations

import functools
import sys

from .commands import COMMANDS
from .schema import DataError


def _quiet(fn):
    """Fire prints return values; the commands print their own reports."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        fn(*args, **kwargs)

    return run


def main(argv: list[str] | None = None) -> None:
    import fire

    try:
        fire.Fire(
            {name: _quiet(fn) for name, fn in COMMANDS.items()}, command=argv, name="fastchat_data"
        )
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
