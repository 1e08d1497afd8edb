"""Build a training set (input_ids, labels, length) on `datasets`, cached in Arrow.

The cache key covers the data files' bytes, the tokenizer, the template, the maximum length
and the options, so a second run with the same inputs loads instantly and any change rebuilds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from .formats import check_format, iter_conversations
from .io import (
    check_inputs,
    check_output_dir,
    check_outputs,
    default_cache_dir,
    replace_dir_atomic,
    sha256_file,
)
from .jsonfile import is_regular_file
from .report import Report, nothing_trainable
from .schema import Conversation, DataError, Message, SkipRecord, check_count, validate
from .templates import SeparatorTemplate, check_template_name
from .tokenize import ConversationTokenizer

T = TypeVar("T")
CACHE_VERSION = "2"  # bump when the encoding itself changes


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(
        json.dumps(
            [
                type(tokenizer).__name__,
                getattr(tokenizer, "legacy", None),
                tokenizer.chat_template,
                tokenizer.all_special_tokens,
            ]
        ).encode()
    )
    return h.hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer(tokenizer) -> None:
    """A DataError unless `tokenizer` is a loaded tokenizer or a folder that holds one (checked
    before the data is read and the tokenizer loaded, which takes seconds)."""
    if not isinstance(tokenizer, str | os.PathLike):
        if isinstance(tokenizer, bool | int | float) or tokenizer is None:
            raise DataError(
                "--tokenizer", "value", f"expects a tokenizer folder, got {tokenizer!r}"
            )
        return
    path = Path(tokenizer)
    if not path.exists():
        raise DataError(str(path), "--tokenizer", "does not exist")
    if not path.is_dir():
        raise DataError(str(path), "--tokenizer", "is a file; give the tokenizer's folder")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise DataError(
            str(path), "--tokenizer", f"holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
        )


def load_tokenizer(tokenizer):
    """A loaded tokenizer, or one from its folder; a path that holds none is a DataError."""
    check_tokenizer(tokenizer)
    if not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    from transformers import AutoTokenizer  # after the checks: importing it takes seconds

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, JSON errors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(str(tokenizer), "--tokenizer", f"cannot be loaded: {first}") from None


def raw_row(conv: Conversation) -> dict:
    """A conversation as a `datasets` row before tokenizing (a preference pair adds its two
    replies to its prompt's)."""
    return {
        "id": conv.id,
        "system": conv.system,
        "roles": [m.role for m in conv.messages],
        "contents": [m.content for m in conv.messages],
    }


def _features():
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "input_ids": ids,
            "labels": ids,
            "length": datasets.Value("int32"),
            "truncated": datasets.Value("string"),
            "skip": datasets.Value("string"),
        }
    )


def _encode_rows(batch: dict, encoder: ConversationTokenizer) -> dict:
    convs = [
        Conversation(id=i, system=s, messages=[Message(r, c) for r, c in zip(roles, contents)])
        for i, s, roles, contents in zip(
            batch["id"], batch["system"], batch["roles"], batch["contents"]
        )
    ]
    out = {"id": [], "input_ids": [], "labels": [], "length": [], "truncated": [], "skip": []}
    for conv, enc in zip(convs, encoder.encode_batch(convs)):
        skipped = isinstance(enc, SkipRecord)
        out["id"].append(conv.id)
        out["input_ids"].append([] if skipped else enc.input_ids)
        out["labels"].append([] if skipped else enc.labels)
        out["length"].append(0 if skipped else len(enc.input_ids))
        out["truncated"].append("" if skipped else enc.truncated)
        out["skip"].append(f"{enc.reason}\t{enc.detail}" if skipped else "")
    return out


def cached_report(cached: Path, command: str) -> Report:
    """The report a cached build was made with, marked as a cache hit."""
    saved = json.loads((cached / "report.json").read_text())
    report = Report(command)
    report.read, report.written, report.truncated = (
        saved["read"],
        saved["written"],
        saved["truncated"],
    )
    report.dropped.update(saved["dropped"])
    report.examples = saved["examples"]
    report.inputs = saved.get("inputs", [])
    report.converted.update(saved.get("converted", {}))
    report.notes = {**saved["notes"], "cache": f"hit {cached}"}
    return report


def load_cached(cached: Path, command: str, strict: bool):
    """(dataset, report) from the cache folder `cached`, or None to build: nothing cached,
    --strict (which must see every record), or a damaged cache, which is named in a warning
    and rebuilt (replaced atomically) rather than trained on or failed with a traceback."""
    if strict or not (cached / "report.json").exists():
        return None
    import datasets

    try:
        ds = datasets.load_from_disk(str(cached))
        if len(ds):
            ds[len(ds) - 1]  # reads to the end of the Arrow data: a cut file fails here
        return ds, cached_report(cached, command)
    except Exception as e:  # Arrow, JSON and OS errors alike mean: build it again
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"warning: cache {cached} is damaged ({first}); building it again", file=sys.stderr)
        return None


@contextlib.contextmanager
def cache_errors(root: Path):
    """A full disk or an unwritable cache folder while building: one line naming the cache."""
    try:
        yield
    except OSError as e:
        raise DataError(str(root), "cache", f"cannot be written: {e.strerror or e}") from None


def keep_encoded(encoded, report: Report, tmp: Path, *, unit: str):
    """The encoded rows that were not skipped, without their bookkeeping columns; each skip
    (naming its `unit` and id) and each cut is counted in `report`."""
    for i, (rid, skip) in enumerate(zip(encoded["id"], encoded["skip"])):
        if skip:
            reason, detail = skip.split("\t", 1)
            report.skip("tokenize", f"{unit} {i} (id {rid})", SkipRecord(reason, detail))
    cuts = Counter(c for t in encoded["truncated"] if t for c in t.split(","))
    report.truncated = sum(bool(t) for t in encoded["truncated"])
    if cuts:
        report.notes["truncated_by"] = dict(sorted(cuts.items()))
    ds = encoded.filter(
        lambda s: not s, input_columns="skip", cache_file_name=str(tmp / "kept.arrow")
    )
    ds = ds.remove_columns(["truncated", "skip"])
    report.written = len(ds)
    return ds


def save_cached(ds, report: Report, key_src: str, *, tmp: Path, cached: Path) -> None:
    """A built dataset, its report and its cache key into `cached`, atomically (staged in tmp)."""
    staged = tmp / "dataset"
    ds.save_to_disk(str(staged))
    (staged / "report.json").write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    (staged / "key.json").write_text(key_src)
    replace_dir_atomic(staged, cached)


def copy_out(cached: Path, out: str, report: Report) -> None:
    """The cached dataset copied to the user's `--out` folder, atomically."""
    try:
        Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=Path(out).resolve().parent, prefix=".build-") as tmp:
            shutil.copytree(cached, Path(tmp) / "out")
            replace_dir_atomic(Path(tmp) / "out", Path(out))
    except OSError as e:
        raise DataError(str(out), "--out", f"cannot be written: {e.strerror or e}") from None
    report.notes["out"] = str(out)


def read_valid(
    paths: list[str],
    report: Report,
    fmt: str | None,
    *,
    iterate: Callable[[str, Report, str | None], Iterable[tuple[str, T]]],
    check: Callable[[T], T],
) -> Iterator[T]:
    """What `iterate` reads from `paths` (conversations, preference pairs) that passes
    `check`; the rest are counted in `report` (under --strict, the first is raised)."""
    for path in paths:
        for where, item in iterate(path, report, fmt):
            try:
                yield check(item)
            except SkipRecord as e:
                report.skip(path, where, e)


def read_trainable(
    paths: list[str], report: Report, fmt: str | None = None
) -> Iterator[Conversation]:
    """Conversations from `paths` that pass `validate`; the rest are counted in `report`."""
    return read_valid(paths, report, fmt, iterate=iter_conversations, check=validate)


MIN_PARALLEL = 1025  # fewer conversations are tokenized in one process (start-up costs more)


def check_num_proc(num_proc: int) -> None:
    check_count("--num_proc", num_proc)
    cpus = os.cpu_count() or 1
    if num_proc > cpus:
        raise DataError(
            "--num_proc", "value", f"{num_proc} is more than this machine's {cpus} CPUs"
        )


def check_rereadable(paths: list[str]) -> None:
    """Inputs that are read twice (hashed for the cache key, then tokenized) must be files."""
    for p in paths:
        if not is_regular_file(p):
            raise DataError(
                p,
                "file",
                "is a pipe or a device: the build reads its input twice (to key the cache, then "
                "to tokenize); give a file",
            )


def unused_num_proc(num_proc: int, n: int, unit: str = "conversations") -> str | None:
    """The note for --num_proc that has no effect: too few rows to tokenize in parallel."""
    if num_proc > 1 and n < MIN_PARALLEL:
        return (
            f"{num_proc} unused: {n:,} {unit} are tokenized in one process (in parallel from "
            f"{MIN_PARALLEL:,} on)"
        )
    return None


def truncation_fix(report: Report, max_length: int, unit: str = "conversations") -> None:
    """A note for rows a cap cut short, saying which cap and how to avoid the cut."""
    if not report.truncated:
        return
    cuts = report.notes.get("truncated_by", {"max_length": report.truncated})
    fixes = []
    if cuts.get("max_length"):
        fixes.append(
            f"{cuts['max_length']:,} cut at --max_length {max_length} lose their end: raise "
            f"--max_length, or split them first (split_long --max_length {max_length})"
        )
    for cap in ("source", "target"):
        if cuts.get(cap):
            fixes.append(f"{cuts[cap]:,} had a turn cut by --max_{cap}_length: raise it")
    report.notes["truncation"] = f"{report.truncated:,} {unit} cut: " + "; ".join(fixes)


@dataclass(frozen=True, kw_only=True)
class TokenizedSet(ABC):
    """The options both tokenized sets take (conversations for SFT, preference pairs for DPO);
    `build` checks them before anything is read, then builds, caches, reports and copies both
    the same way. A subclass says what differs: its rows, encoding, cache key and notes."""

    template: str = "vicuna_v1.1"
    max_length: int = 2048
    out: str | None = None  # a folder the set is copied to
    fmt: str | None = None  # the input's format (none: detected from each file)
    num_proc: int = 1
    cache_dir: str | None = None
    strict: bool = False
    report_path: str | None = None
    quiet: bool = False  # no report printed

    command: ClassVar[str]  # the report's name
    unit: ClassVar[str]  # one row is one ...
    key_prefix: ClassVar[str]  # of the cache folder's name
    batch_size: ClassVar[int]
    nothing: ClassVar[tuple[str, ...]] = ()  # what nothing_trainable says (none: its default)

    @abstractmethod
    def check_format(self) -> None:
        """A DataError for an --fmt this set cannot read (checked before anything is read)."""

    @abstractmethod
    def encoder(self, tok) -> ConversationTokenizer:
        """What renders and tokenizes a row with the loaded tokenizer `tok`."""

    @abstractmethod
    def cache_key(self) -> dict:
        """What, beside the data, the tokenizer and the template, makes the set what it is."""

    @abstractmethod
    def read_rows(self, paths: list[str], report: Report) -> list[dict]:
        """The raw rows, each with its "system"."""

    def encode_kwargs(self) -> dict:
        """The batched map function's keyword arguments beside the encoder."""
        return {}

    @abstractmethod
    def add_notes(self, report: Report) -> None:
        """The set's own notes."""

    @staticmethod
    @abstractmethod
    def encode(batch: dict, encoder: ConversationTokenizer, **kwargs) -> dict:
        """The batched map function: raw rows in, tokenized rows out."""

    @staticmethod
    @abstractmethod
    def features():
        """The tokenized rows' `datasets.Features`."""

    @staticmethod
    @abstractmethod
    def row_lengths(ds) -> list[int]:
        """Every tokenized sequence's length (both sides of a pair)."""

    def build(self, data: str | list[str], tokenizer):
        """Tokenize `data`; returns (datasets.Dataset, Report)."""
        paths, tok = self.checked_start(data, tokenizer)
        return self.tokenize_cached(paths, tok, self.encoder(tok))

    def checked_start(self, data, tokenizer):
        """The arguments checked before anything is read, then `datasets` imported (quietly)
        and the tokenizer loaded. Returns (paths, tokenizer)."""
        paths = [data] if isinstance(data, str | os.PathLike) else list(data)
        check_tokenizer(tokenizer)
        paths = check_inputs([str(p) for p in paths])
        check_count("--max_length", self.max_length)
        check_num_proc(self.num_proc)
        self.check_format()
        check_rereadable(paths)
        check_outputs(paths, {"--report": self.report_path})
        if self.out:
            check_output_dir(Path(self.out), paths)
        check_template_name(self.template)
        import datasets  # after the checks of the arguments: importing it takes a second

        datasets.disable_progress_bars()
        return paths, load_tokenizer(tokenizer)

    def tokenize_cached(self, paths: list[str], tok, encoder: ConversationTokenizer):
        import datasets

        # a custom template (a dict or a file) is keyed by its content, not its name
        template = self.template
        template_key = (
            repr(encoder.template) if isinstance(encoder.template, SeparatorTemplate) else template
        )
        key_src = json.dumps(
            {
                **self.cache_key(),
                "data": [sha256_file(Path(p)) for p in paths],
                "tokenizer": tokenizer_fingerprint(tok),
                "template": template_key,
            },
            sort_keys=True,
        )
        digest = self.key_prefix + hashlib.sha256(key_src.encode()).hexdigest()[:20]
        root = Path(self.cache_dir or default_cache_dir()) / "datasets"
        cached = root / digest
        num_proc = self.num_proc
        if hit := load_cached(cached, self.command, self.strict):
            ds, report = hit
        else:
            report = Report(self.command, strict=self.strict)
            rows = self.read_rows(paths, report)
            if not rows:
                raise nothing_trainable(paths, report, *self.nothing)
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DataError(
                    str(root), "cache", f"cannot be written: {e.strerror or e}"
                ) from None
            with cache_errors(root), tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
                raw = datasets.Dataset.from_list(rows)
                encoded = raw.map(
                    self.encode,
                    fn_kwargs={"encoder": encoder, **self.encode_kwargs()},
                    batched=True,
                    batch_size=self.batch_size,
                    features=self.features(),
                    num_proc=num_proc if num_proc > 1 and len(rows) >= MIN_PARALLEL else None,
                    remove_columns=raw.column_names,
                    cache_file_name=str(Path(tmp) / "encoded.arrow"),
                    new_fingerprint=digest,
                    desc=f"tokenizing {self.unit}s",
                )
                ds = keep_encoded(encoded, report, Path(tmp), unit=self.unit)
                if not report.written:
                    raise nothing_trainable(paths, report, *self.nothing)
                lengths = self.row_lengths(ds)
                report.notes.update(
                    {
                        "template": getattr(encoder.template, "name", str(template)),
                        "max_length": self.max_length,
                        "tokens": int(sum(lengths)),
                        "max_tokens": int(max(lengths, default=0)),
                        "boundary_splits": encoder.boundary_splits,
                    }
                )
                self.add_notes(report)
                report.notes.update(template_notes(encoder, [r["system"] for r in rows]))
                save_cached(ds, report, key_src, tmp=Path(tmp), cached=cached)
            ds = datasets.load_from_disk(str(cached))
            report.notes["cache"] = f"built {cached}"
            if note := unused_num_proc(num_proc, len(rows), f"{self.unit}s"):
                report.notes["num_proc"] = note
        if self.out:
            copy_out(cached, self.out, report)
        if not self.quiet:
            report.emit(self.report_path)
        return ds, report


@dataclass(frozen=True, kw_only=True)
class ConversationSet(TokenizedSet):
    """Conversations for SFT: input_ids, labels (assistant tokens only, unless
    train_on_inputs), length."""

    train_on_inputs: bool = False
    max_source_length: int | None = None  # each prompt turn cut to this many tokens
    max_target_length: int | None = None  # each reply cut to this many tokens

    command: ClassVar[str] = "build"
    unit: ClassVar[str] = "conversation"
    key_prefix: ClassVar[str] = ""
    batch_size: ClassVar[int] = 512
    encode = staticmethod(_encode_rows)
    features = staticmethod(_features)

    def check_format(self) -> None:
        check_format(self.fmt)

    def encoder(self, tok) -> ConversationTokenizer:
        return ConversationTokenizer(
            tok,
            self.template,
            max_length=self.max_length,
            train_on_inputs=self.train_on_inputs,
            max_source_length=self.max_source_length,
            max_target_length=self.max_target_length,
        )

    def cache_key(self) -> dict:
        return {
            "version": CACHE_VERSION,
            "max_length": self.max_length,
            "max_source_length": self.max_source_length,
            "max_target_length": self.max_target_length,
            "format": self.fmt,
            "train_on_inputs": self.train_on_inputs,
        }

    def read_rows(self, paths: list[str], report: Report) -> list[dict]:
        return [raw_row(c) for c in read_trainable(paths, report, self.fmt)]

    @staticmethod
    def row_lengths(ds) -> list[int]:
        return ds["length"]

    def add_notes(self, report: Report) -> None:
        truncation_fix(report, self.max_length)


def build_dataset(data: str | list[str], tokenizer, template: str = "vicuna_v1.1", **options):
    """Tokenize `data` for training; returns (datasets.Dataset, Report). `options`: those of
    ConversationSet (max_length, out, fmt, train_on_inputs, num_proc, cache_dir, strict,
    report_path, quiet, max_source_length, max_target_length). See module doc."""
    return ConversationSet(template=template, **options).build(data, tokenizer)


def template_notes(encoder: ConversationTokenizer, systems: list[str]) -> dict:
    """Template fields that did nothing for this data and tokenizer, each with its fix."""
    notes = {}
    template = encoder.template
    if isinstance(template, SeparatorTemplate):
        if systems and all(systems) and template.system:
            notes["template_system"] = (
                f"unused: all {len(systems):,} conversations have their own system prompt, "
                "which replaces the template's (drop the data's to use it)"
            )
        if template.add_bos and not encoder.prefix_ids:
            notes["template_add_bos"] = (
                "unused: this tokenizer adds no BOS token to put first (set add_bos: false in "
                "a template file to say so, or use a tokenizer with one)"
            )
    return notes
