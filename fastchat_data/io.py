"""Reading records (JSON arrays and JSON Lines, streamed: see jsonfile.py) and writing outputs
atomically (through outputs.py).

Every failure to read or write is a DataError naming the file, the line or record, and what is
wrong: the command line prints it as one line, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .jsonfile import check_readable_file, read_json_records
from .outputs import OutputRefused, _same, guard_dir, guard_file, staged_file, swap_in, write_text
from .schema import DataError

read_records = read_json_records  # (where, record) for each record of a file


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
    """`data` as commands take it: a path, comma-separated paths, or a list of paths. A string
    that names an existing file (or folder) whole is that one path, commas and all."""
    if isinstance(data, list | tuple):
        return [str(p) for p in data]
    text = str(data)
    if "," not in text or os.path.lexists(text):
        return [text] if text else []
    return [p for p in text.split(",") if p]


def check_inputs(data, flag: str = "--data") -> list[str]:
    """The input paths of `data` (see input_paths), each checked to be a readable data file
    before anything is read or written; a part of a comma-split argument that does not exist
    says that the argument was split."""
    paths = input_paths(data)
    if not paths:
        raise DataError(flag, "value", "names no file")
    split = not isinstance(data, list | tuple) and len(paths) > 1
    for path in paths:
        if split and not os.path.lexists(path):
            raise DataError(
                path,
                "file",
                f"does not exist ({flag} {str(data)!r} was read as {len(paths)} files separated "
                "by commas, since no file has that whole name)",
            )
        check_readable_file(Path(path))
    return paths


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
    guard_dir(out, inputs, "--out", marker=marker)


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
