"""The one writer of every output camelid makes, and the guard in front of it.

Every file and folder a command writes (data files, reports, tokenized sets, checkpoints,
exports, adapters, merges, converted checkpoints, caches) goes through `staged_file` or
`StagedDir` (or a helper built on them), and the guard runs before anything is written:

- no output may be, hold or sit inside one of the command's inputs, through any spelling of
  the path (relative, `..`, symlinks, hard links);
- an existing folder is replaced only when it carries the marker of what this kind of output
  writes (a previous run of the same command wrote it); a folder anyone else made is refused;
- an existing file output that is read-only is refused (never replaced, its mode never
  reset); a symlink is written through (the link stays, its target gets the new content); a
  FIFO or a character device (`/dev/stdout`) is written to directly, streamed, as a shell
  redirect would; sockets and block devices are refused.

Writes are atomic: a file is written beside its final name and renamed over it; a folder is
staged beside its final name and swapped in with one `renameat2(RENAME_EXCHANGE)` (Linux), so
there is never a moment with neither the old nor the new folder, then the old one is removed.
Where the kernel or file system cannot exchange, the old folder is renamed aside first and
the new one renamed in (a window of one rename). New files and folders get the mode a plain
`open()` / `mkdir()` gives them under the user's umask (libraries such as safetensors and
`tempfile` create them 0600).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .schema import DataError


class OutputRefused(DataError):
    """An output the guard will not write: names the output, the option and why."""

    def __init__(self, path, flag: str, reason: str):
        super().__init__(str(path), flag, reason)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(path)).resolve()


def _same(a: Path, b: Path) -> bool:
    if _resolved(a) == _resolved(b):
        return True
    try:  # hard links, bind mounts
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    return _resolved(parent) in _resolved(child).parents


def check_not_input(out: Path, inputs: Iterable, flag: str) -> None:
    """Refuse `out` if it is an input, holds one, or (a folder output) sits inside one."""
    for src in (Path(p) for p in inputs if p):
        if _same(out, src):
            spelled = "" if str(src) == str(out) else f" ({src})"
            kind = "folder" if src.is_dir() else "file"
            raise OutputRefused(out, flag, f"is also an input {kind}{spelled}")
        if _inside(src, out):
            raise OutputRefused(out, flag, f"holds the input {src}; replacing it would delete it")
        if src.is_dir() and _inside(out, src):
            raise OutputRefused(out, flag, f"is inside the input folder {src}")


OWNED = ".camelid-owned"  # in a folder that declares the paths in it that its owner writes


def owned_by_another(path: Path) -> Path | None:
    """The folder whose owner writes `path` (it lists `path`, or a folder above it, in its
    OWNED file: a training run's folder lists its checkpoints, metrics and exports), if any."""
    path = _resolved(path)
    for folder in path.parents:
        listing = folder / OWNED
        if listing.is_file():
            try:
                owned = {line.strip() for line in listing.read_text().splitlines() if line.strip()}
            except OSError:
                return None
            first = path.relative_to(folder).parts[0]
            return folder if first in owned else None
    return None


def check_not_owned(path: Path, flag: str, owner: Path | None) -> None:
    """Refuse to replace what another command's folder owns (a run's checkpoints, metrics,
    export), unless this writer is that folder's owner."""
    folder = owned_by_another(path) if path.exists() or path.is_symlink() else None
    if folder is not None and (owner is None or _resolved(Path(owner)) != folder):
        raise OutputRefused(
            path,
            flag,
            f"belongs to the run in {folder} (its {OWNED} lists it); "
            "refusing to replace it: choose a path outside it",
        )


def guard_file(
    path: str | os.PathLike,
    inputs: Iterable = (),
    flag: str = "--out",
    *,
    owner: Path | None = None,
) -> Path:
    """Check a file output; returns the path to write (a symlink's target, else `path`)."""
    path = Path(path)
    check_not_input(path, inputs, flag)
    check_not_owned(path, flag, owner)
    try:  # through links: /dev/stdout -> /proc/self/fd/1 -> a pipe, which no path resolves to
        kind = os.stat(path).st_mode
    except OSError:
        kind = 0
    if stat.S_ISFIFO(kind) or stat.S_ISCHR(kind):
        return path  # written to directly (a pipe, /dev/stdout, /dev/null)
    if path.is_symlink():
        target = _resolved(path)
        check_not_input(target, inputs, flag)
        path = target
    if not path.exists():
        parent = path.parent if str(path.parent) else Path(".")
        if parent.exists() and not parent.is_dir():
            raise OutputRefused(path, flag, f"cannot be written: {parent} is not a folder")
        return path
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise OutputRefused(path, flag, "is a folder; give a file name")
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return path  # written to directly (a pipe, /dev/stdout, /dev/null)
    if not stat.S_ISREG(mode):
        raise OutputRefused(path, flag, "is not a regular file (a socket or a block device)")
    # no write bit at all is read-only even for root, whom os.access lets write anything
    if not os.access(path, os.W_OK) or not mode & 0o222:
        raise OutputRefused(path, flag, "is read-only; refusing to replace it")
    return path


def guard_dir(
    path: str | os.PathLike,
    inputs: Iterable = (),
    flag: str = "--out",
    *,
    marker: str | Callable[[Path], bool] | None = None,
    owner: Path | None = None,
) -> Path:
    """Check a folder output that will be replaced whole; returns the path to write (a
    symlink's target). An existing non-empty folder must be one this kind of output wrote
    before: it holds the file `marker`, or `marker(folder)` says so; with no marker any
    existing non-empty folder is refused. `owner`: the folder this writer owns (a run writing
    its own checkpoints and export)."""
    path = Path(path)
    check_not_input(path, inputs, flag)
    check_not_owned(path, flag, owner)
    if path.is_symlink():
        path = _resolved(path)
        check_not_input(path, inputs, flag)
    if path.exists():
        if not path.is_dir():
            raise OutputRefused(path, flag, f"is a file; {flag} names a folder to write")
        if any(path.iterdir()) and not _marked(path, marker):
            what = (
                f"no {marker} in it"
                if isinstance(marker, str)
                else ("another command wrote it" if marker else "it is not empty")
            )
            raise OutputRefused(
                path,
                flag,
                f"is a folder that this command did not write; refusing to replace it ({what}): "
                "choose another folder",
            )
        if not os.access(path.parent, os.W_OK):
            raise OutputRefused(path, flag, f"cannot be replaced: {path.parent} is read-only")
    return path


def _marked(folder: Path, marker) -> bool:
    if marker is None:
        return False
    if callable(marker):
        return bool(marker(folder))
    return (folder / marker).exists()


def _fix_modes(root: Path) -> None:
    """Files 0666 and folders 0777 under the umask, as open() and mkdir() would make them."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~umask)
        for name in files:
            full = os.path.join(folder, name)
            if not os.path.islink(full):
                os.chmod(full, 0o666 & ~umask)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(staged: Path, final: Path) -> None:
    """Put the finished folder `staged` at `final`, replacing what was there; never a moment
    with neither where the kernel can exchange two names."""
    staged, final = Path(staged), Path(final)
    if final.exists() or final.is_symlink():
        if _exchange(staged, final):
            shutil.rmtree(staged, ignore_errors=True)  # now holds the old folder
            return
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)


class StagedDir:
    """A folder output written in stages: `begin()` checks the guard and makes the staging
    folder beside the final one; the caller (or every rank) writes into it; `commit()` fixes
    modes and swaps it in; `abort()` removes it. `with StagedDir(...) as tmp:` does all three.

    Multi-rank writers (checkpoints) call begin() on one rank, write on all, commit() on one."""

    def __init__(
        self,
        final: str | os.PathLike,
        *,
        inputs: Iterable = (),
        flag: str = "--out",
        marker: str | Callable[[Path], bool] | None = None,
        staging: Path | None = None,
        owner: Path | None = None,
    ):
        self.final = guard_dir(final, inputs, flag, marker=marker, owner=owner)
        self.staging = staging or self.final.with_name(f".tmp-{self.final.name}")

    def begin(self) -> Path:
        shutil.rmtree(self.staging, ignore_errors=True)  # a killed earlier attempt's
        try:
            self.staging.mkdir(parents=True)
        except OSError as e:
            raise OutputRefused(self.final, "output", f"cannot be written: {e.strerror}") from None
        return self.staging

    def commit(self) -> Path:
        _fix_modes(self.staging)
        swap_in(self.staging, self.final)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.begin()

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


@contextlib.contextmanager
def staged_file(
    path: str | os.PathLike,
    *,
    inputs: Iterable = (),
    flag: str = "--out",
    owner: Path | None = None,
    mode: str = "w",
    encoding: str | None = "utf-8",
) -> Iterator:
    """An open file whose content appears at `path` only once complete (see the guard)."""
    target = guard_file(path, inputs, flag, owner=owner)
    kind = target.stat().st_mode if target.exists() else 0
    binary = "b" in mode
    if stat.S_ISFIFO(kind) or stat.S_ISCHR(kind):  # a pipe or a device: stream into it
        try:
            with open(target, mode, encoding=None if binary else encoding) as f:
                yield f
        except BrokenPipeError:  # the reader went away (`--out /dev/stdout | head`)
            raise
        except OSError as e:  # a full device (/dev/full)
            raise OutputRefused(path, flag, f"cannot be written: {e.strerror or e}") from None
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise OutputRefused(path, flag, f"cannot be written: {e.strerror or e}") from None
    keep = stat.S_IMODE(kind) if kind else 0o666 & ~_umask()
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, keep)
        os.replace(tmp, target)
    except OSError as e:  # a full disk, a vanished folder
        raise OutputRefused(path, flag, f"cannot be written: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(
    path: str | os.PathLike, text: str, *, inputs: Iterable = (), flag: str = "--out"
) -> None:
    with staged_file(path, inputs=inputs, flag=flag) as f:
        f.write(text)
