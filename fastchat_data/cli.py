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
    except (DataError, OSError, ValueError) as e:
        # bad input is one line naming the file, never a traceback (exit 2, as for bad usage)
        message = " ".join(str(e).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
