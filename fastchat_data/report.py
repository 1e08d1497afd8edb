"""Every command ends with a Report: what was read, written, dropped (by reason), truncated,
each input file (its format and records), and every lossy conversion (what became what, in how
many records). Its numbers are the numbers of what was written."""

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
    # each input file: {"path", "format", "records"} (records read from it)
    inputs: list = field(default_factory=list)
    # lossy conversions: "what -> what it became" -> records it happened in
    converted: Counter = field(default_factory=Counter)
    # a command whose counts are of several kinds (split_long: conversations, chunks, pairs)
    # says so in its own headline; `units` names what a drop reason counts ("pair", "turn")
    headline: str | None = None
    units: dict = field(default_factory=dict)

    def skip(self, path: str, where: str, err: SkipRecord, *, n: int = 1) -> None:
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

    def input_file(self, path: str, fmt: str | None = None) -> dict:
        """The entry of input `path` (made on first use): count its records in "records"."""
        for entry in self.inputs:
            if entry["path"] == str(path):
                return entry
        entry = {"path": str(path), "format": fmt or "?", "records": 0}
        self.inputs.append(entry)
        return entry

    def set_format(self, entry: dict, fmt: str) -> None:
        """Record an input's format; notes["format"] is the format when all inputs share one."""
        entry["format"] = fmt
        formats = {e["format"] for e in self.inputs if e["format"] != "?"}
        self.notes["format"] = formats.pop() if len(formats) == 1 else "mixed (see inputs)"

    def merge(self, other: Report) -> None:
        self.read += other.read
        self.written += other.written
        self.truncated += other.truncated
        self.dropped.update(other.dropped)
        self.converted.update(other.converted)
        self.inputs.extend(other.inputs)
        for reason, shown in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[: MAX_EXAMPLES_PER_REASON - len(mine)])
        for k, v in other.notes.items():
            self.notes.setdefault(k, v)

    def to_dict(self) -> dict:
        out = {
            "command": self.command,
            "read": self.read,
            "written": self.written,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_total": self.dropped_total,
            "truncated": self.truncated,
            "inputs": self.inputs,
            "converted": dict(self.converted),
            "notes": self.notes,
            "examples": self.examples,
        }
        if self.units:
            out["dropped_units"] = self.units
        return out

    def format(self) -> str:
        lines = [
            self.headline
            or (
                f"[{self.command}] read {self.read:,}  written {self.written:,}  "
                f"dropped {self.dropped_total:,}  truncated {self.truncated:,}"
            )
        ]
        for entry in self.inputs:
            lines.append(
                f"  input {entry['path']}: {entry['format']}, {entry['records']:,} records"
            )
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            unit = self.units.get(reason)
            lines.append(f"  dropped {n:>7,}  {reason}" + (f" ({unit}s)" if unit else ""))
            for ex in self.examples.get(reason, []):
                lines.append(f"           e.g. {ex[:160]}")
        fields = []  # "field 'x' -> dropped", on one line together
        for what, n in sorted(self.converted.items(), key=lambda kv: (-kv[1], kv[0])):
            if what.startswith(("field ", "turn field ")) and what.endswith(" -> dropped"):
                fields.append(f"{what.removesuffix(' -> dropped')} ({n:,})")
            else:
                lines.append(f"  converted {what}: in {n:,} records")
        if fields:
            lines.append(f"  dropped fields no output format keeps (records): {', '.join(fields)}")
        for k, v in self.notes.items():
            if not (k == "format" and self.inputs):  # each input line names its format
                lines.append(f"  {k}: {v}")
        return "\n".join(lines)

    def emit(self, report_path: str | None = None, stream=sys.stderr) -> Report:
        print(self.format(), file=stream)
        if report_path:
            from .io import write_text_atomic

            write_text_atomic(report_path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False))
        return self


def nothing_trainable(
    paths: list[str], report: Report, what: str = "no conversation is trainable"
) -> DataError:
    """The error for data of which nothing survives: the skip reasons, counted."""
    reasons = ", ".join(
        f"{n} {reason}" + (f" ({report.units[reason]}s)" if reason in report.units else "")
        for reason, n in report.dropped.most_common()
    )
    example = next((shown[0] for shown in report.examples.values() if shown), "")
    detail = f"skipped {reasons}" if reasons else "the data holds no records"
    error = DataError(
        ",".join(map(str, paths)),
        f"all {report.read} records",
        f"{what} ({detail})" + (f"; e.g. {example[:200]}" if example else ""),
    )
    error.report = report  # what was read and dropped, for a Python caller
    return error


def refuse_empty(records, paths: list[str], rep: Report, *, what: str = "no record can be written"):
    """`records`, passed through; none at all is a DataError (the atomic writer then leaves no
    file): an empty output with exit status 0 would look like success."""
    n = 0
    for rec in records:
        n += 1
        yield rec
    if not n:
        raise nothing_trainable(paths, rep, what)
