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


def storage_error(e: BaseException | None, path: str | Path) -> OutputError | None:
    """An OutputError naming `path` when `e`, or an error it was raised from, is a storage failure.
    (torch.save reports a failed write as a RuntimeError raised while handling the OSError.)"""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return OutputError(f"{path}: cannot write it: {os.strerror(e.errno)}")
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


def new_memmap(path: str | Path, shape: tuple[int, ...], final: str | Path) -> Any:
    """A new float32 `.npy` memory map at `path` with its disk allocated now: a map written past a full
    disk kills the process with SIGBUS instead of raising. A disk too small for it is an OutputError
    naming `final` (the file it becomes), and leaves no file at `path`."""
    import numpy as np

    try:
        with writing(final):
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
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
