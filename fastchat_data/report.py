"""Every command ends with a Report: what was read, written, dropped (by reason), truncated."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field

from .schema import DataError, SkipRecord

MAX_EXAMPLES_PER_REASON = 3


@dataclass
class Report:
    command: str
    read: int = 0
    written: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    notes: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)  # reason -> ["file:record 3: detail", ...]
    strict: bool = False

    def skip(self, path: str, where: str, err: SkipRecord, n: int = 1) -> None:
        """Count `n` skipped items (records, or pairs), or raise a DataError under --strict."""
        if self.strict:
            raise DataError(path, where, str(err)) from err
        self.drop(err.reason, f"{path}: {where}: {err.detail or err.reason}", n=n)

    def drop(self, reason: str, example: str = "", n: int = 1) -> None:
        self.dropped[reason] += n
        if example:
            shown = self.examples.setdefault(reason, [])
            if len(shown) < MAX_EXAMPLES_PER_REASON:
                shown.append(example)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: Report) -> None:
        self.read += other.read
        self.written += other.written
        self.truncated += other.truncated
        self.dropped.update(other.dropped)
        for reason, shown in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[: MAX_EXAMPLES_PER_REASON - len(mine)])
        for k, v in other.notes.items():
            self.notes.setdefault(k, v)

    def to_dict(self) -> dict:
        return {
            "command": self.command,
            "read": self.read,
            "written": self.written,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_total": self.dropped_total,
            "truncated": self.truncated,
            "notes": self.notes,
            "examples": self.examples,
        }

    def format(self) -> str:
        lines = [
            f"[{self.command}] read {self.read:,}  written {self.written:,}  "
            f"dropped {self.dropped_total:,}  truncated {self.truncated:,}"
        ]
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  dropped {n:>7,}  {reason}")
            for ex in self.examples.get(reason, []):
                lines.append(f"           e.g. {ex[:160]}")
        for k, v in self.notes.items():
            lines.append(f"  {k}: {v}")
        return "\n".join(lines)

    def emit(self, report_path: str | None = None, stream=sys.stderr) -> Report:
        print(self.format(), file=stream)
        if report_path:
            from .io import write_text_atomic

            write_text_atomic(report_path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False))
        return self
