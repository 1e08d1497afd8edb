"""Reading records (JSON arrays, JSON Lines streamed) and writing outputs atomically.

Every failure to read or write is a DataError naming the file, the line or record, and what is
wrong: the command line prints it as one line, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .outputs import OutputRefused, _same, guard_dir, guard_file, staged_file, swap_in, write_text
from .schema import DataError

BOM = b"\xef\xbb\xbf"


def sha256_file(path: str | os.PathLike) -> str:
    """A file's sha256, read in 16 MiB blocks (checkpoint shards run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """A file's sha256, remembered by (path, size, modification time) under the cache folder,
    so that a resume does not read gigabytes of data again to find them unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = Path(cache_dir or default_cache_dir()) / "sha256" / f"{key}.txt"
    try:
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    digest = sha256_file(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs the next hash
    return digest


def default_cache_dir() -> Path:
    """Where tokenized sets and other derived files are cached: $CAMELID_CACHE, else
    ~/.cache/camelid."""
    return Path(os.environ.get("CAMELID_CACHE", Path.home() / ".cache" / "camelid"))


def save_tokenizer(tok, out_dir) -> None:
    """`save_pretrained`, keeping a Llama tokenizer's `legacy` flag: transformers 5 does not
    save it and reloads as legacy=False, which changes how text after `</s>` tokenizes."""
    tok.save_pretrained(out_dir)
    if getattr(tok, "legacy", None) is not None:
        cfg_path = Path(out_dir) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["legacy"] = tok.legacy
        cfg_path.write_text(json.dumps(cfg, indent=2))


def input_paths(data) -> list[str]:
    """`data` as commands take it: a path, comma-separated paths, or a list of paths."""
    if isinstance(data, list | tuple):
        return [str(p) for p in data]
    return [p for p in str(data).split(",") if p]


def check_readable_file(path: Path, what: str = "file") -> None:
    """A DataError unless `path` is an existing, readable regular file."""
    if not path.exists():
        raise DataError(str(path), what, "does not exist")
    if path.is_dir():
        raise DataError(str(path), what, "is a directory, not a data file")
    if not os.access(path, os.R_OK):
        raise DataError(str(path), what, "cannot be read (permission denied)")


def _decode_error(path: Path, raw: bytes, err: UnicodeDecodeError, line: int | None = None):
    """Where a decode error sits (line and byte) and whether the file was cut mid-character."""
    if line is None:
        line = raw.count(b"\n", 0, err.start) + 1
    column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
    cut = err.reason == "unexpected end of data" and err.end >= len(raw.rstrip(b"\r\n"))
    why = (
        "the file ends in the middle of a UTF-8 character (truncated?)"
        if cut
        else f"not valid UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8"
    )
    return DataError(str(path), f"line {line} byte {column}", why)


def _is_json_lines(path: Path) -> bool:
    """.jsonl, or a file whose first line is one whole JSON value; a file that starts with "["
    or spreads one object over several lines (pretty-printed) is one JSON document."""
    if path.suffix == ".jsonl":
        return True
    with open(path, "rb") as f:
        for raw in f:
            stripped = raw.removeprefix(BOM).strip()
            if not stripped:
                continue
            if stripped[:1] == b"[":
                return False
            try:
                json.loads(stripped)
            except (ValueError, UnicodeDecodeError):
                return stripped[:1] != b"{"  # an object cut across lines: a JSON document
            return True
    return False


def _malformed(path: Path, e: json.JSONDecodeError, truncated: bool, line: int | None = None):
    hint = " (the text ends early: truncated file?)" if truncated else ""
    return DataError(
        str(path), f"line {line or e.lineno} column {e.colno}", f"malformed JSON: {e.msg}{hint}"
    )


def _read_lines(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _decode_error(path, raw, e, lineno) from None
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                # a last line without its newline that does not parse: the file was cut short
                raise _malformed(path, e, not raw.endswith(b"\n"), lineno) from None


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """Yield (where, record) for each record: `where` is "line N" (JSONL) or "record N" (array).

    JSON Lines are streamed line by line; a JSON array is parsed whole (the format allows no
    better), and its records are handed out one at a time. A UTF-8 byte order mark is read
    past. Malformed JSON, bytes that are not UTF-8, an empty file or a path that is not a
    readable file raise DataError naming the file and the line.
    """
    path = Path(path)
    check_readable_file(path)
    if path.stat().st_size == 0:
        raise DataError(str(path), "file", "is empty: no records")
    try:
        if _is_json_lines(path):
            yield from _read_lines(path)
            return
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(str(path), "file", f"cannot be read: {e.strerror or e}") from None
    try:
        text = raw.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _decode_error(path, raw.removeprefix(BOM), e) from None
    if not text.strip():
        raise DataError(str(path), "file", "holds only white space: no records")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _malformed(path, e, not text.rstrip().endswith(("]", "}"))) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            str(path), "top level", f"expected a JSON array of records, found {type(data).__name__}"
        )
    for i, rec in enumerate(data):
        yield f"record {i}", rec


def check_outputs(inputs: Iterable, outputs: dict, in_place: bool = False) -> None:
    """The guard (fastchat_data.outputs) for each file output before anything is written, and
    no two outputs naming the same file. `outputs` maps an option name (`--out`) to its path
    (None: not written). With `in_place` an output may be an input; the atomic writer makes
    that safe (the input is read, or streamed from the old file, before the new one takes its
    name)."""
    given = [(flag, Path(p)) for flag, p in outputs.items() if p]
    sources = [] if in_place else [Path(p) for p in inputs]
    for k, (flag, out) in enumerate(given):
        try:
            guard_file(out, sources, flag)
        except OutputRefused as e:
            if "is also an input" in e.reason and flag == "--out":
                raise OutputRefused(
                    out, flag, e.reason + "; add --in_place to replace it"
                ) from None
            raise
        for other_flag, other in given[:k]:
            if _same(other, out):
                raise DataError(str(out), flag, f"is also {other_flag}: each output needs its own")


def check_output_dir(out: Path, inputs: Iterable, marker: str = "dataset_info.json") -> None:
    """An output folder that will be replaced whole (see fastchat_data.outputs.guard_dir)."""
    guard_dir(out, inputs, "--out", marker)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_text(path, text, flag="output")


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as JSON Lines (.jsonl) or a JSON array (anything else), atomically.

    The file appears under its name only once complete, so a crash (or a bad input found
    half-way) never leaves half a file, nor touches an existing one.
    """
    path = Path(path)
    n = 0
    with staged_file(path, flag="output") as f:
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
    return n


def replace_dir_atomic(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an existing `dst` is replaced (never a moment
    with neither, see fastchat_data.outputs.swap_in)."""
    swap_in(Path(src), Path(dst))
