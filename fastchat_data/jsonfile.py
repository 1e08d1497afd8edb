"""Records from a JSON array, a JSON document or a JSON Lines file, streamed.

`json.load` reads the whole file before it parses a byte: a 2 GB file with no newline was read
whole (4.3 GB resident) before failing on its first byte, and a JSON array was built whole
before its first record was used. Here a file is read forward in 1 MiB blocks and each record
is parsed as soon as its text is complete, so memory is bounded by one record
(`MAX_RECORD_BYTES`), and a bad byte stops the read where it is.

Why not ijson (the maintained streaming parser, whose yajl2_c backend is as fast): records
are parsed here by the standard library's own C decoder (`json.JSONDecoder.raw_decode`, one
record at a time), so a record reads exactly as `json.loads` reads it (floats stay floats, not
ijson's Decimal; NaN and duplicate keys as before), and every syntax error keeps its line and
column, which yajl's messages do not give. No new dependency either.

Where a record is, in messages: "line N" (JSON Lines) or "record N" (an array); a syntax
error gives its "line L column C".
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from .schema import DataError

BOM = b"\xef\xbb\xbf"
BLOCK = 1 << 20  # bytes read at a time
MAX_RECORD_BYTES = 64 << 20  # the longest JSON Lines line, or record of an array, accepted
FOREIGN_BOMS = {  # longest first: UTF-32 LE starts with UTF-16 LE's mark
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
_WS = re.compile(r"[ \t\n\r]*")
_NOT_WS = re.compile(rb"[^ \t\n\r]")
_DECODE = json.JSONDecoder().raw_decode
# a lone surrogate can only come from an escape (UTF-8 cannot encode one): "\ud83d" alone
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_MB = MAX_RECORD_BYTES >> 20


def check_readable_file(path: Path, what: str = "file") -> None:
    """A DataError unless `path` is an existing, readable regular file, a pipe or a character
    device (`/dev/stdin`)."""
    if not path.exists():
        raise DataError(str(path), what, "does not exist")
    if path.is_dir():
        raise DataError(str(path), what, "is a directory, not a data file")
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        raise DataError(str(path), what, "is not a file (a socket or a block device)")
    if not os.access(path, os.R_OK):
        raise DataError(str(path), what, "cannot be read (permission denied)")


def is_regular_file(path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a JSON boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a single JSON number ({value!r})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a single JSON string ({shown!r})"
    if isinstance(value, dict):
        return f"one JSON object (keys: {', '.join(map(str, list(value)[:8])) or 'none'})"
    return f"a {type(value).__name__}"


def _not_records(path, value) -> DataError:
    """The error for a file whose top level is not records: what it holds, and what is wanted."""
    if value == []:
        return DataError(str(path), "top level", "is an empty JSON array: no records")
    if value == {}:
        return DataError(str(path), "top level", "holds one empty JSON object: no records")
    hint = " (one record? put it in a JSON array: [ ... ])" if isinstance(value, dict) else ""
    return DataError(
        str(path),
        "top level",
        f"expected a JSON array of records or JSON Lines, found {_kind(value)}{hint}",
    )


def _lone_surrogate(path, where: str, value) -> DataError | None:
    """A record holding an unpaired UTF-16 surrogate escape ("\\ud83d" without its pair): valid
    JSON syntax, but not a character; writing or tokenizing it would fail later, unnamed."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if m := _SURROGATE.search(v):
                return DataError(
                    str(path),
                    where,
                    f"holds an unpaired surrogate escape \\u{ord(m.group()):04x}, which is not a "
                    "character (half of an emoji cut by the program that wrote the file?); "
                    "fix or drop that record",
                )
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def _too_deep(path, where: str) -> DataError:
    return DataError(
        str(path), where, "malformed JSON: nested too deeply to read (over ~1,000 levels)"
    )


def _cut(text: str, e: json.JSONDecodeError) -> bool:
    """Whether a syntax error is the end of the text coming early (a file cut short)."""
    end = len(text.rstrip())
    return (
        e.msg.startswith("Unterminated string")
        or e.pos >= end
        or (e.msg.startswith("Invalid \\uXXXX") and e.pos >= end - 6)
    )


def _hint(text: str, pos: int, truncated: bool) -> str:
    if truncated:
        return " (the text ends early: truncated file?)"
    if "\x00" in text[max(pos - 2, 0) : pos + 2]:
        return " (NUL characters: is it UTF-16 text? save it as UTF-8)"
    return ""


class _Source:
    """A binary file read in blocks, with bytes that can be pushed back."""

    def __init__(self, f):
        self.f, self.back = f, []

    def read(self) -> bytes:
        return self.back.pop() if self.back else self.f.read(BLOCK)

    def unread(self, data: bytes) -> None:
        if data:
            self.back.append(data)


class _Lines:
    """Raw lines (with their newline), each at most MAX_RECORD_BYTES long: a longer one comes
    back cut there, with `complete` False, so a newline-free file is never read whole."""

    def __init__(self, src: _Source):
        self.src, self.buf, self.pos = src, b"", 0

    def next(self) -> tuple[bytes, bool] | None:
        nl = self.buf.find(b"\n", self.pos)
        if nl >= 0:
            line, self.pos = self.buf[self.pos : nl + 1], nl + 1
            return line, True
        parts, size = [self.buf[self.pos :]], len(self.buf) - self.pos
        self.buf, self.pos = b"", 0
        while True:
            block = self.src.read()
            if not block:
                tail = b"".join(parts)
                return (tail, True) if tail else None
            nl = block.find(b"\n")
            if nl >= 0:
                parts.append(block[: nl + 1])
                self.buf, self.pos = block, nl + 1
                return b"".join(parts), True
            parts.append(block)
            size += len(block)
            if size > MAX_RECORD_BYTES:
                return b"".join(parts), False

    def unread(self, lines: list[bytes]) -> None:
        """Give back `lines` (the last ones read) and everything buffered after them."""
        self.src.unread(self.buf[self.pos :])
        for line in reversed(lines):
            self.src.unread(line)
        self.buf, self.pos = b"", 0


def decode_error(path, raw: bytes, err: UnicodeDecodeError, *, line: int, column: int, eof: bool):
    """Where a decode error sits (line and byte) and whether the file was cut mid-character."""
    cut = err.reason == "unexpected end of data" and eof
    why = (
        "the file ends in the middle of a UTF-8 character (truncated?)"
        if cut
        else f"not valid UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8"
    )
    return DataError(str(path), f"line {line} byte {column}", why)


def _line_decode_error(path, raw: bytes, err: UnicodeDecodeError, *, line: int) -> DataError:
    column = err.start + 1
    eof = err.end >= len(raw.rstrip(b"\r\n"))
    return decode_error(
        path, raw, err, line=line, column=column, eof=eof and not raw.endswith(b"\n")
    )


def _read_lines(path: Path, lines: _Lines) -> Iterator[tuple[str, object]]:
    """JSON Lines: one record per line; blank lines are skipped. A file that holds a single
    value (one line) is read as a document: an array's items, or a {"data": [...]} object's."""
    lineno, count, first = 0, 0, None
    while (got := lines.next()) is not None:
        raw, complete = got
        lineno += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if complete:
                raise _line_decode_error(path, raw, e, line=lineno) from None
            line = raw[: e.start].decode("utf-8")  # a long line: diagnose what decodes
        if not complete:
            raise _long_line(path, line, lineno)
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            rec = json.loads(line.rstrip("\r\n"))  # so that an error's line is this one
        except json.JSONDecodeError as e:
            # a last line without its newline that does not parse: the file was cut short
            truncated = not raw.endswith(b"\n") and _cut(line, e)
            reason = f"malformed JSON: {e.msg}{_hint(line, e.pos, truncated)}"
            raise DataError(str(path), f"line {lineno} column {e.colno}", reason) from None
        except RecursionError:
            raise _too_deep(path, where) from None
        if _SURROGATE_ESCAPE_BYTES.search(raw) and (bad := _lone_surrogate(path, where, rec)):
            raise bad
        count += 1
        if count == 1:  # held until a second record shows that the file is JSON Lines
            first = (where, rec)
            continue
        if count == 2:
            yield first
        yield where, rec
    if count == 0:
        raise DataError(str(path), "file", "holds only white space: no records")
    if count == 1:  # one value in the whole file
        where, value = first
        if isinstance(value, dict) and isinstance(value.get("data"), list):
            value = value["data"]
        if isinstance(value, list) and value:
            yield from ((f"record {i}", rec) for i, rec in enumerate(value))
        elif isinstance(value, dict) and value:
            yield where, value
        else:
            raise _not_records(path, value)


def _long_line(path, partial: str, lineno: int) -> DataError:
    """A line longer than the limit: its syntax error if it has one before the cut (a file that
    is not JSON fails on its first bad byte), else what is wrong."""
    try:
        json.loads(partial)
    except json.JSONDecodeError as e:
        if e.pos < len(partial) - 10 and not e.msg.startswith("Unterminated string"):
            return DataError(
                str(path),
                f"line {lineno} column {e.colno}",
                f"malformed JSON: {e.msg}{_hint(partial, e.pos, False)}",
            )
    except RecursionError:
        return _too_deep(path, f"line {lineno}")
    return DataError(
        str(path),
        f"line {lineno}",
        f"runs past {_MB} MiB without an end of line: not JSON Lines (one record per line), "
        f"or a record over the {_MB} MiB limit",
    )


class _Text:
    """The file's text, decoded block by block: `buf[pos:]` is what is not consumed yet."""

    def __init__(self, path: Path, src: _Source):
        self.path, self.src = path, src
        self.buf, self.pos, self.eof = "", 0, False
        self.lines, self.carry = 0, 0  # newlines before buf[0]; characters of its line before it
        self.pending = b""  # the start of a UTF-8 character cut by the end of a block
        self.byte_lines, self.byte_line_start, self.byte_offset = 0, 0, 0

    # -- reading --------------------------------------------------------------------------

    def fill(self, want: int = 0) -> None:
        """Read at least `want` more bytes (a block at least), or up to the end of the file."""
        want = max(want, BLOCK)
        if self.pos:
            self._drop(self.pos)
        blocks, n = [], 0
        while n < want:
            block = self.src.read()
            if not block:
                self.eof = True
                break
            blocks.append(block)
            n += len(block)
        data = self.pending + b"".join(blocks)
        try:
            text, self.pending = data.decode("utf-8"), b""
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data" or self.eof or e.start < len(data) - 3:
                raise self._decode_error(data, e) from None
            text, self.pending = data[: e.start].decode("utf-8"), data[e.start :]
        done = data[: len(data) - len(self.pending)]
        k = done.rfind(b"\n")
        if k >= 0:
            self.byte_lines += done.count(b"\n")
            self.byte_line_start = self.byte_offset + k + 1
        self.byte_offset += len(done)
        self.buf += text

    def _decode_error(self, data: bytes, e: UnicodeDecodeError) -> DataError:
        line = self.byte_lines + data.count(b"\n", 0, e.start) + 1
        k = data.rfind(b"\n", 0, e.start)
        column = e.start - k if k >= 0 else self.byte_offset + e.start - self.byte_line_start + 1
        return decode_error(self.path, data, e, line=line, column=column, eof=self.eof)

    def _drop(self, n: int) -> None:
        k = self.buf.rfind("\n", 0, n)
        if k >= 0:
            self.lines += self.buf.count("\n", 0, n)
            self.carry = n - k - 1
        else:
            self.carry += n
        self.buf, self.pos = self.buf[n:], self.pos - n

    def where(self, p: int) -> str:
        line = self.lines + self.buf.count("\n", 0, p) + 1
        k = self.buf.rfind("\n", 0, p)
        return f"line {line} column {p - k if k >= 0 else self.carry + p + 1}"

    def peek(self) -> str:
        """The next character after white space ("" at the end of the file)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos : self.pos + 1]
            self.fill()

    def value(self, record: str = ""):
        """The JSON value at the cursor (after white space). `record` ("record 3") is named in
        messages."""
        self.peek()
        while True:
            try:
                value, end = _DECODE(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # text cut by the end of the block (not of the file): read more and parse again
                if not self.eof and (
                    e.pos >= len(self.buf) - 10 or e.msg.startswith("Unterminated string")
                ):
                    size = len(self.buf) - self.pos
                    if size > MAX_RECORD_BYTES:
                        raise self._too_long(record) from None
                    self.fill(size)
                    continue
                context = f" (in {record})" if record else ""
                cut = self.eof and _cut(self.buf, e)
                raise self.malformed(e.msg + context, e.pos, cut) from None
            except RecursionError:
                where = f"{record or 'top level'} at {self.where(self.pos)}"
                raise _too_deep(self.path, where) from None
            if end >= len(self.buf) and not self.eof:  # a number may go on in the next block
                self.fill()
                continue
            if _SURROGATE_ESCAPE.search(self.buf, self.pos, end):
                if bad := _lone_surrogate(self.path, record or self.where(self.pos), value):
                    raise bad
            self.pos = end
            return value

    def malformed(self, msg: str, pos: int, truncated: bool = False):
        reason = f"malformed JSON: {msg}{_hint(self.buf, pos, truncated)}"
        return DataError(str(self.path), self.where(pos), reason)

    def _too_long(self, record: str) -> DataError:
        return DataError(
            str(self.path),
            f"{record or 'top level'} at {self.where(self.pos)}",
            f"runs past {_MB} MiB without ending: a record over the {_MB} MiB limit, or a file "
            "that is not JSON records (cut short?)",
        )


def _read_array(text: _Text) -> Iterator[tuple[str, object]]:
    """The records of the JSON array at the cursor, one at a time."""
    text.pos += 1  # "["
    if text.peek() == "]":
        text.pos += 1
        raise _not_records(text.path, [])
    index = 0
    while True:
        record = f"record {index}"
        yield record, text.value(record)
        index += 1
        c = text.peek()
        if c == ",":
            text.pos += 1
            continue
        if c == "]":
            text.pos += 1
            return
        if not c:
            raise text.malformed(f"the array ends after {record} without ']'", text.pos, True)
        raise text.malformed(f"Expecting ',' delimiter (after {record})", text.pos)


def _read_object(text: _Text) -> Iterator[tuple[str, object]]:
    """A JSON object at the top level: the records of its "data" array, streamed (as some
    exports wrap them); any other object is not records."""
    text.pos += 1  # "{"
    keys, found = [], False
    while (c := text.peek()) != "}":
        if keys or found:
            if c != ",":
                raise text.malformed("Expecting ',' delimiter", text.pos, truncated=not c)
            text.pos += 1
            text.peek()
        start = text.pos
        key = text.value()
        if not isinstance(key, str):
            raise text.malformed("Expecting property name enclosed in double quotes", start)
        if text.peek() != ":":
            raise text.malformed("Expecting ':' delimiter", text.pos, truncated=text.eof)
        text.pos += 1
        if key == "data" and text.peek() == "[" and not found:
            found = True
            yield from _read_array(text)
        else:
            text.value(f"the value of {key!r}")
            keys.append(key)
    text.pos += 1
    if not found:
        raise _not_records(text.path, dict.fromkeys(keys))


def read_json_records(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """Yield (where, record) for each record of a JSON Lines file, a JSON array, or a JSON
    object whose "data" is the array; see the module doc. A UTF-8 byte order mark is read
    past. Malformed JSON, bytes that are not UTF-8, a file that holds no records, or a path
    that is not a readable file raise DataError naming the file and where."""
    path = Path(path)
    check_readable_file(path)
    try:
        with open(path, "rb") as f:
            yield from _read(path, _Source(f))
    except OSError as e:
        raise DataError(str(path), "file", f"cannot be read: {e.strerror or e}") from None


def _read(path: Path, src: _Source) -> Iterator[tuple[str, object]]:
    head = src.read()
    if not head:
        raise DataError(str(path), "file", "is empty: no records")
    for mark, name in FOREIGN_BOMS.items():
        if head.startswith(mark):
            raise DataError(
                str(path),
                "file",
                f"is {name} text (its byte order mark is {mark.hex(' ').upper()}); "
                "save it as UTF-8",
            )
    head = head.removeprefix(BOM)
    first = _NOT_WS.search(head)
    while first is None:  # white space so far
        more = src.read()
        if not more:
            raise DataError(str(path), "file", "holds only white space: no records")
        head += more
        first = _NOT_WS.search(head, len(head) - len(more))
    src.unread(head)
    char = head[first.start() : first.start() + 1]
    lines = _Lines(src)
    if path.suffix == ".jsonl":
        yield from _read_lines(path, lines)
        return
    if char == b"{":
        # JSON Lines if its first line is a whole JSON value; else one JSON document
        # (pretty-printed), read as a whole document below
        read = _first_line(lines)
        lines.unread(read)
        if read and _parses(read[-1]):
            yield from _read_lines(path, lines)
            return
    text = _Text(path, src)
    c = text.peek()
    if c == "[":
        yield from _read_array(text)
        what = "JSON array"
    elif c == "{":
        yield from _read_object(text)
        what = "JSON object"
    else:
        raise _not_records(path, text.value())
    if text.peek():
        raise DataError(
            str(path), "top level", f"extra data after the {what} at {text.where(text.pos)}"
        )


def _first_line(lines: _Lines) -> list[bytes]:
    """The lines up to the first that is not blank; [] when that one is over the limit."""
    read = []
    while (got := lines.next()) is not None:
        read.append(got[0])
        if not got[1]:
            lines.unread(read)
            return []
        if got[0].strip():
            break
    return read


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError
        return False
    return True
