"""Reading records (JSON arrays, JSON Lines streamed) and writing outputs atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .schema import DataError


def input_paths(data) -> list[str]:
    """`data` as commands take it: a path, comma-separated paths, or a list of paths."""
    if isinstance(data, list | tuple):
        return [str(p) for p in data]
    return [p for p in str(data).split(",") if p]


def _is_json_lines(path: Path) -> bool:
    if path.suffix == ".jsonl":
        return True
    with open(path, encoding="utf-8") as f:
        while ch := f.read(1):
            if not ch.isspace():
                return ch != "["
    return False


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """Yield (where, record) for each record: `where` is "line N" (JSONL) or "record N" (array).

    JSON Lines are streamed line by line; a JSON array is parsed whole (the format allows no
    better), and its records are handed out one at a time. Malformed JSON raises DataError
    naming the file and the line.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "file", "does not exist")
    if _is_json_lines(path):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        str(path), f"line {lineno} column {e.colno}", f"malformed JSON: {e.msg}"
                    ) from None
        return
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(
                str(path), f"line {e.lineno} column {e.colno}", f"malformed JSON: {e.msg}"
            ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            str(path), "top level", f"expected a JSON array of records, found {type(data).__name__}"
        )
    for i, rec in enumerate(data):
        yield f"record {i}", rec


def _tmp_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as JSON Lines (.jsonl) or a JSON array (anything else), atomically.

    The file appears under its name only once complete, so a crash never leaves half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            lines = path.suffix == ".jsonl"
            if not lines:
                f.write("[\n")
            for rec in records:
                if lines:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                else:
                    f.write((",\n" if n else "") + json.dumps(rec, ensure_ascii=False, indent=None))
                n += 1
            if not lines:
                f.write("\n]\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def replace_dir_atomic(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an existing `dst` is replaced."""
    dst = Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
