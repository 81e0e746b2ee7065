"""The logit cache: the teacher's logits over the transfer data, computed once and kept on disk.

The cache is a memory-mapped float32 `.npy` (N, C) written under a temporary name and renamed when
complete, with a JSON sidecar holding its key: each teacher file and the data file by resolved path,
size and modification time, plus the chosen output. A later run with the same key (another width or
rank, say) reuses the file instead of running the teacher again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from compress.atomic import atomic_path
from compress.teachers import Progress, Teacher


def file_key(path: str | Path) -> dict[str, Any]:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(teacher_paths: list[str | Path], data_path: str | Path | None, output: str,
              n: int) -> dict[str, Any]:
    return {
        "teachers": [file_key(p) for p in teacher_paths],
        "data": file_key(data_path) if data_path is not None else None,
        "output": output,
        "samples": n,
    }


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


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


def compute_targets(teacher: Teacher, x: np.ndarray, path: str | Path, key: dict[str, Any] | None,
                    batch_size: int = 1024, progress: Progress | None = None) -> np.ndarray:
    """Run the teacher over x in batches, writing its logits to `path`; returns them memory-mapped."""
    path = Path(path)
    first = teacher.logits(x[:1])  # the class count, and a cheap check that the teacher runs
    n, c = x.shape[0], first.shape[1]
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, c))
        for start in range(0, n, batch_size * 16):
            stop = min(n, start + batch_size * 16)
            out[start:stop] = teacher.logits(x[start:stop], batch_size)
            if progress:
                progress(stop, n)
        out.flush()
        del out
    if key is not None:
        with atomic_path(_sidecar(path)) as tmp, open(tmp, "w") as f:
            json.dump(key, f, indent=1)
    elif _sidecar(path).exists():
        os.remove(_sidecar(path))
    return np.load(path, mmap_mode="r", allow_pickle=False)
