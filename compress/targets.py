"""The logit cache: the teacher's logits over the transfer data, computed once and kept on disk.

The cache is a float32 `.npy` (N, C). It is filled chunk by chunk in a memory-mapped `.<name>.partial`
file; at most every COMMIT_SECONDS (and at the end) the finished rows are flushed to disk and only
then is their count committed (atomically) to `.<name>.progress.json`. A run killed at any point
(kill -9 included) is continued by the same command from the last committed chunk; chunk boundaries
do not move between runs, so the result equals an uninterrupted run's bit for bit. The final name
appears only when the file is complete.

The cache's key, in `<name>.json` beside it: each teacher file and the data (file, or every shard of
a folder) by resolved path, size and modification time (not a content hash: hashing a transfer set
larger than memory would cost a full read), the chosen output, and the sample count. A run with the
same key reuses the file: `distill` with another width or rank never runs the teacher again.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from compress.atomic import atomic_path, exclusive, new_memmap
from compress.teachers import Progress, Teacher

CHUNK_ROWS = 16_384  # rows per chunk, rounded up to whole teacher batches
COMMIT_SECONDS = 0.25  # commit finished chunks at most this often (a commit is a flush and an fsync)


def file_key(path: str | Path) -> dict[str, Any]:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def data_key(path: str | Path) -> list[dict[str, Any]] | dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        return [file_key(p) for p in sorted(path.iterdir()) if p.suffix.lower() == ".npy"]
    return file_key(path)


def cache_key(teacher_paths: list[str | Path], data_path: str | Path | None, output: str,
              n: int) -> dict[str, Any]:
    return {
        "teachers": [file_key(p) for p in teacher_paths],
        "data": data_key(data_path) if data_path is not None else None,
        "output": output,
        "samples": n,
    }


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _partial(path: Path) -> tuple[Path, Path]:
    return path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.progress.json")


def cache_writes(path: str | Path, option: str) -> list[tuple[str, Path, str]]:
    """Every name a cache at `path` is written under (for atomic.refuse_overwrite): the file, its key,
    and the hidden partial, progress, lock, shard and temporary files beside it."""
    path = Path(path)
    names = (path.name, _sidecar(path).name, f".{path.name}*", f"..{path.name}*", f".{_sidecar(path).name}*")
    return [(f"{option} {path}", path.parent, n) for n in names]


def labelled_so_far(path: str | Path, since: float = 0.0) -> tuple[int, int] | None:
    """(rows committed, rows in all) of an unfinished cache at `path` whose progress was committed at
    or after time `since`; None when there is none."""
    state_path = _partial(Path(path))[1]
    try:
        if state_path.stat().st_mtime < since:
            return None
        state = json.loads(state_path.read_text())
        done, n = int(state["done"]), int(state["shape"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return (done, n) if done > 0 else None


def load_cached(path: str | Path, key: dict[str, Any]) -> np.ndarray | None:
    """The cached logits (memory-mapped) when the file exists and its key matches, else None."""
    path = Path(path)
    side = _sidecar(path)
    if not (path.exists() and side.exists()):
        return None
    try:
        if json.loads(side.read_text()) != key:
            return None
        z = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return z if z.ndim == 2 and z.shape[0] == key["samples"] else None


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _resume(final: Path, key: Any, shape: tuple[int, int]) -> tuple[Any, int]:
    """(memory map, rows already done): the partial file of the cache `final` when it belongs to this
    run, else a new one."""
    partial, state_path = _partial(final)
    if partial.exists() and state_path.exists():
        try:
            state = json.loads(state_path.read_text())
            if state["key"] == key and tuple(state["shape"]) == shape:
                return np.lib.format.open_memmap(partial, mode="r+"), int(state["done"])
        except (OSError, ValueError, KeyError):
            pass
    out = new_memmap(partial, shape, final)  # a full disk says so now, not with a SIGBUS later
    _write_json(state_path, {"key": key, "shape": list(shape), "done": 0})
    return out, 0


def compute_targets(teacher: Teacher, x: Any, path: str | Path, key: dict[str, Any] | None,
                    batch_size: int = 1024, progress: Progress | None = None) -> np.ndarray:
    """Run the teacher over x (an array, memory map or `Shards`) chunk by chunk into `path`,
    resuming an interrupted run with the same key; returns the logits memory-mapped."""
    path = Path(path)
    with exclusive(path.with_name(f".{path.name}.lock"), str(path)):  # one labelling run per cache
        return _compute_targets(teacher, x, path, key, batch_size, progress)


def _compute_targets(teacher: Teacher, x: Any, path: Path, key: dict[str, Any] | None, batch_size: int,
                     progress: Progress | None) -> np.ndarray:
    first = teacher.logits(np.asarray(x[0:1], dtype=np.float32))  # class count; fixes the output kind
    n, c = len(x), first.shape[1]
    partial, state_path = _partial(path)
    out, done = _resume(path, key, (n, c))
    step = teacher.signature.batch or batch_size
    chunk = step * max(1, -(-CHUNK_ROWS // step))  # whole batches, so padding only ever ends the data
    starts = list(range(done, n, chunk))

    def read(start: int) -> np.ndarray:  # runs in a thread, overlapping the teacher's work
        return np.ascontiguousarray(x[start : min(n, start + chunk)], dtype=np.float32)

    if progress:
        progress(done, n)
    last_commit = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, starts[0]) if starts else None
        for i, start in enumerate(starts):
            assert pending is not None
            rows = pending.result()
            pending = pool.submit(read, starts[i + 1]) if i + 1 < len(starts) else None
            stop = start + rows.shape[0]
            z = teacher.logits(rows, batch_size)
            if not np.isfinite(z).all():  # never cached: a later distill would train on it
                from compress.errors import TeacherError

                bad = start + int(np.flatnonzero(~np.isfinite(z).all(axis=1))[0])
                raise TeacherError(f"TEACHER {getattr(teacher, 'name', '')}: gives NaN or inf logits "
                                   f"(first on row {bad} of the data); nothing was cached")
            out[start:stop] = z
            if stop == n or time.perf_counter() - last_commit >= COMMIT_SECONDS:
                out.flush()  # the rows reach the disk before the progress that counts them
                _write_json(state_path, {"key": key, "shape": [n, c], "done": stop})
                last_commit = time.perf_counter()
            if progress:
                progress(stop, n)
    del out
    os.replace(partial, path)
    if key is not None:
        _write_json(_sidecar(path), key)
    elif _sidecar(path).exists():
        os.remove(_sidecar(path))
    state_path.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def shard_cache(path: Path, key: dict[str, Any] | None, a: int, b: int) -> tuple[Path, dict[str, Any]]:
    """Where rows a:b of the cache at `path` are labelled under torchrun, and that shard's key."""
    return path.with_name(f".{path.name}.shard-{a}-{b}.npy"), {"run": key, "shard": [a, b], "samples": b - a}


def compute_targets_distributed(teacher: Teacher, x: Any, path: str | Path, key: dict[str, Any] | None,
                                world: Any, batch_size: int = 1024) -> np.ndarray:
    """Under torchrun: each rank labels its contiguous shard into a cache of its own beside `path`
    (`.<name>.shard-<start>-<stop>.npy`, resumable like `compute_targets`: the same command with the
    same number of processes continues a killed run), every rank receives all the logits, and rank 0
    writes them to `path` (atomically). The shard caches, and any left by a run with another number of
    processes, are removed once every rank has the logits."""
    from compress import distributed
    from compress.data import Rows

    path = Path(path)
    a, b = distributed.shard(len(x), world)
    first = teacher.logits(np.asarray(x[0:1], dtype=np.float32))  # every rank fixes the output kind on row 0
    mine, mine_key = shard_cache(path, key, a, b)
    part = load_cached(mine, mine_key)  # a shard finished before the run was stopped
    if part is None and a < b:
        part = compute_targets(teacher, Rows(x, np.arange(a, b)), mine, mine_key, batch_size)
    elif part is None:  # more processes than rows
        part = np.zeros((0, first.shape[1]), np.float32)
    z = distributed.gather_rows(np.asarray(part), len(x), world)
    del part
    if world.main:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, z)
        if key is not None:
            _write_json(_sidecar(path), key)
    distributed.barrier(world)  # every rank has its logits: no shard is needed any more
    for pattern in (f".{path.name}.shard-*", f"..{path.name}.shard-*"):  # caches, then their partials
        for f in path.parent.glob(pattern):  # (those of another process count too)
            f.unlink(missing_ok=True)
    return z
