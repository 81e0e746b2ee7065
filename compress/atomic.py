"""Nothing half-written under a final name: write to a temporary name in the same folder, then rename.

A write that fails because of where it goes (a full disk, a quota, a read-only or forbidden folder)
is the user's to fix, not a bug: it becomes an `OutputError` naming the final file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compress.errors import OutputError

STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
# inside a write to a path the user chose, these too are about that path: a file where a folder
# should be, a folder that cannot be made (/proc/x), a name too long
OUTPUT_ERRNOS = STORAGE_ERRNOS | {errno.ENOTDIR, errno.EEXIST, errno.ENOENT, errno.EISDIR,
                                  errno.ENAMETOOLONG, errno.EINVAL}


def storage_error(e: BaseException | None, path: str | Path) -> OutputError | None:
    """An OutputError naming `path` when `e`, or an error it was raised from, is a storage failure.
    (torch.save reports a failed write as a RuntimeError raised while handling the OSError.)"""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS:
            why = os.strerror(e.errno)
            if e.errno in (errno.EEXIST, errno.ENOTDIR):
                why = "a file stands where its folder should be"
            return OutputError(f"{path}: cannot write it: {why}")
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Storage failures inside the block become an OutputError naming `path`."""
    try:
        yield
    except Exception as e:
        err = storage_error(e, path)
        if err is None:
            raise
        raise err from None


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[str]:
    """Yield a temporary path beside `final`; on success rename it to `final`, on error remove it.
    Write through a Python file object (`open(tmp, "wb")`) where a library takes one: a full disk
    then names its cause."""
    final = Path(final)
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            yield str(tmp)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()


def new_memmap(path: str | Path, shape: tuple[int, ...], final: str | Path, dtype: str = "float32") -> Any:
    """A new `.npy` memory map (float32 unless `dtype` says otherwise) at `path` with its disk allocated
    now: a map written past a full disk kills the process with SIGBUS instead of raising. A disk too
    small for it is an OutputError naming `final` (the file it becomes), and leaves no file at `path`."""
    import numpy as np

    try:
        with writing(final):
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
        _allocate(Path(path), final)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    return out


def _allocate(path: Path, final: str | Path) -> None:
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    nbytes = path.stat().st_size
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as e:
            if e.errno not in STORAGE_ERRNOS:
                return  # EOPNOTSUPP, EINVAL, ...: a filesystem that cannot reserve; writes go unreserved
            free = shutil.disk_usage(path.parent).free
            raise OutputError(f"{final}: cannot write it: {os.strerror(e.errno)} (needs "
                              f"{nbytes / 1e6:,.1f} MB; {free / 1e6:,.1f} MB free there)") from None


@contextlib.contextmanager
def exclusive(lock: str | Path, what: str) -> Iterator[None]:
    """Hold the lock file `lock` for the block: a second compress run on the same output fails at once
    with an OutputError naming `what` and the holder's pid, instead of interleaving its writes. The
    lock (an advisory flock) goes with the process however it ends; the file is removed on the way out.
    A run that locked a file just removed by the holder sees that it is not at `lock` any more and
    takes the one there now, so two runs never both hold it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    lock = Path(lock)
    with writing(lock):
        lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with writing(lock):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(f"{what}: another compress run (pid {holder}) is writing there; wait for "
                              "it to finish, or choose another") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed it between our open and our lock: try the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # before the unlock: whoever waits on this file then sees it gone
        os.close(fd)


def _files(path: Path) -> list[Path]:
    """The files an input names: itself, or a folder's files (shard folders)."""
    if path.is_dir():
        return [p for p in sorted(path.iterdir()) if p.is_file()]
    return [path] if path.exists() else []


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def refuse_overwrite(inputs: dict[str, str | Path | None | list[str | Path]],
                     writes: list[tuple[str, str | Path, str]]) -> None:
    """No output of a command may land on one of its inputs. `inputs`: option (or argument) -> the
    file(s) it names; `writes`: (option, folder, glob pattern) for every name the command may write
    there (temporary names included). An input that a write would replace, by resolved path or as
    the same file under another name (a hard link), is a ConfigError naming both, before any work."""
    import fnmatch

    for label, value in inputs.items():
        for given in value if isinstance(value, list) else [value]:
            if given is None:
                continue
            for f in _files(Path(given)):
                for out_label, folder, pattern in writes:
                    folder = Path(folder)
                    inside = _same(f.parent, folder) if folder.exists() else (
                        f.parent.resolve() == folder.resolve())
                    exact = folder / pattern
                    if (inside and fnmatch.fnmatchcase(f.name, pattern)) or (
                            not any(c in pattern for c in "*?[") and _same(f, exact)):
                        where = given if Path(given) == f else f"{given} ({f.name})"
                        raise OutputError(
                            f"{out_label}: would write over {label} {where}; the inputs of a command "
                            "are never replaced: choose another output name or folder")
