"""Reading transfer and evaluation data: `.npy` (memory-mapped), a folder of `.npy` shards (read in
name order, each memory-mapped), `.npz` and numeric `.csv`.

Every loader checks what it reads and raises `DataError` with the option and file named, so that a
bad file is reported in one line before any teacher or training work starts. `open_inputs` checks
without reading the data whole (chunks of rows), so a transfer set larger than memory can be labelled.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import DataError

FORMATS = (".npy", ".npz", ".csv")
_CHUNK_ROWS = 65536  # rows checked at a time, so a memory-mapped file is never read whole


class Shards:
    """Several `.npy` files, each memory-mapped, read as one array along the first axis.

    Supports what the pipeline uses: `len`, `shape`, `dtype`, `ndim`, row slices, integer index arrays,
    and `reshape` of the sample axes."""

    def __init__(self, parts: list[np.ndarray], names: list[str]):
        self.parts, self.names = parts, names
        self.offsets = np.cumsum([0] + [p.shape[0] for p in parts])
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
        self.dtype, self.ndim = parts[0].dtype, parts[0].ndim

    def __len__(self) -> int:
        return self.shape[0]

    def reshape(self, shape: tuple[int, ...]) -> Shards:
        return Shards([p.reshape((p.shape[0], *shape[1:])) for p in self.parts], self.names)

    def __getitem__(self, idx: slice | np.ndarray) -> np.ndarray:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(self.shape[0])
            if step != 1:
                return self[np.arange(start, stop, step)]
            pieces = []
            for i, part in enumerate(self.parts):
                lo, hi = self.offsets[i], self.offsets[i + 1]
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    pieces.append(np.asarray(part[a - lo : b - lo]))
            return np.concatenate(pieces) if pieces else np.empty((0, *self.shape[1:]), self.dtype)
        idx = np.asarray(idx)
        out = np.empty((idx.size, *self.shape[1:]), self.dtype)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for i in np.unique(shard):
            sel = shard == i
            out[sel] = self.parts[i][idx[sel] - self.offsets[i]]
        return out


class Rows:
    """Some rows of an array-like (memory map, `Shards`), by sorted index, read only when sliced:
    the training part of a transfer set too large to copy."""

    def __init__(self, base: np.ndarray | Shards, idx: np.ndarray):
        self.base, self.idx = base, np.asarray(idx)
        self.shape = (int(self.idx.size), *base.shape[1:])
        self.dtype, self.ndim = base.dtype, base.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.base[self.idx[rows]])


def open_shards(folder: Path, what: str) -> Shards:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".npy")
    if not files:
        raise DataError(f"{what} {folder}: is a folder without .npy shards")
    parts = [load_array(f, what=f"{what} shard") for f in files]
    first = parts[0]
    for f, p in zip(files[1:], parts[1:], strict=True):
        if p.shape[1:] != first.shape[1:] or p.dtype != first.dtype:
            raise DataError(f"{what} shard {f}: samples of shape {p.shape[1:]} and dtype {p.dtype}, but "
                            f"{files[0].name} has {first.shape[1:]} and {first.dtype}")
    return Shards(parts, [f.name for f in files])


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} {path}: file not found")
    if path.is_dir():
        raise DataError(f"{what} {path}: is a folder; expected .npy shards or one of {', '.join(FORMATS)}")
    if not path.is_file():  # opening a FIFO blocks until a writer comes; a device never ends
        raise DataError(f"{what} {path}: is not a regular file (a pipe, device or socket); save the "
                        "data to a file first")
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{what} {path}: unsupported format '{path.suffix}'; use {', '.join(FORMATS)}")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    if size == 0:
        raise DataError(f"{what} {path}: file is empty")


def _read_csv(path: Path, what: str) -> np.ndarray:
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1  # a header row
    try:
        arr = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
    except ValueError as e:
        raise DataError(f"{what} {path}: not a numeric CSV file ({e})") from None
    return arr


def load_array(path: str | Path, *, what: str = "--data", key: str | None = None) -> np.ndarray:
    """Open an array file. `.npy` is memory-mapped (read-only), never read whole here.

    `what` is the option the file came from; it starts every error message. `key` picks the array of
    an `.npz` holding several. Pickled objects are never loaded.
    """
    path = Path(path)
    if path.is_dir():
        return open_shards(path, what)  # type: ignore[return-value]
    _check_file(path, what)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if key is None and len(names) != 1:
                    raise DataError(f"{what} {path}: holds arrays {names}; pick one with --key")
                name = key if key is not None else names[0]
                if name not in names:
                    raise DataError(f"{what} {path}: no array named '{name}' (has {names})")
                arr = archive[name]
        else:
            arr = _read_csv(path, what)
    except DataError:
        raise
    except (ValueError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        kind = suffix.lstrip(".")
        raise DataError(f"{what} {path}: not a valid .{kind} array file ({e})") from None
    if not isinstance(arr, (np.ndarray, Shards)):
        raise DataError(f"{what} {path}: does not hold an array")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{what} {path}: holds {arr.dtype} values; expected numbers")
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise DataError(f"{what} {path}: holds no samples (shape {arr.shape})")
    return arr


def check_finite(arr: np.ndarray, path: str | Path, what: str = "--data") -> None:
    """Raise if any value is NaN or infinite, naming the first bad row. Reads in chunks."""
    if arr.dtype.kind != "f":
        return
    for start in range(0, arr.shape[0], _CHUNK_ROWS):
        chunk = np.asarray(arr[start : start + _CHUNK_ROWS])
        bad = ~np.isfinite(chunk.reshape(chunk.shape[0], -1)).all(axis=1)
        if bad.any():
            row = start + int(np.argmax(bad))
            raise DataError(f"{what} {path}: contains NaN or inf values (first in sample {row})")


def fit_shape(
    arr: np.ndarray, sample_shape: tuple[int | None, ...] | None, path: str | Path, what: str = "--data"
) -> np.ndarray:
    """Match `arr`'s samples to the teacher's input shape (None = any size along that axis; a shape
    of None, as for PyTorch teachers that do not record one, takes the data as it is).

    Flat rows (`(N, D)`, as from a CSV) are reshaped when D equals the product of a fixed shape.
    """
    if sample_shape is None:
        return arr
    got = tuple(arr.shape[1:])
    if len(got) == len(sample_shape) and all(
        e is None or e == g for e, g in zip(sample_shape, got, strict=True)
    ):
        return arr
    fixed = all(e is not None for e in sample_shape)
    if fixed and arr.ndim == 2 and math.prod(sample_shape) == got[0]:  # type: ignore[arg-type]
        return arr.reshape((arr.shape[0], *sample_shape))
    want = tuple("?" if e is None else e for e in sample_shape)
    raise DataError(f"{what} {path}: samples have shape {got} but the teacher expects {want}")


def open_inputs(
    path: str | Path,
    sample_shape: tuple[int | None, ...] | None,
    *,
    what: str = "--data",
    key: str | None = None,
    inputs: tuple[str, ...] = (),
    dtype: str = "float32",
) -> np.ndarray:
    """Open and check (non-empty, finite, right shape) inputs without reading them whole: a memory map
    or `Shards` for .npy files and folders. Rows are converted to float32 where they are used. With
    `inputs` (a token-id teacher's input names), the (N, I, L) int64 stack of an .npz's arrays of those
    names, in memory (compress.tokens). `dtype`, the teacher's input type: an integer one (uint8
    pixels) also needs whole numbers within its range (`check_integers`)."""
    if inputs:
        from compress.tokens import load_npz

        return load_npz(path, inputs, what)
    arr = load_array(path, what=what, key=key)
    arr = fit_shape(arr, sample_shape, path, what)
    check_finite(arr, path, what)
    if np.dtype(dtype).kind in "iu":
        check_integers(arr, np.dtype(dtype), path, what)
    return arr


def load_inputs(
    path: str | Path,
    sample_shape: tuple[int | None, ...] | None,
    *,
    what: str = "--data",
    key: str | None = None,
    inputs: tuple[str, ...] = (),
    dtype: str = "float32",
) -> np.ndarray:
    """Load, check (non-empty, finite, right shape) and return inputs held in memory: float32, or the
    teacher's own integer type when `dtype` is one (token ids: see `open_inputs`)."""
    arr = open_inputs(path, sample_shape, what=what, key=key, inputs=inputs, dtype=dtype)
    if inputs:
        return arr
    held = np.dtype(dtype) if np.dtype(dtype).kind in "iu" else np.float32
    return np.ascontiguousarray(arr[0 : len(arr)], dtype=held)


def random_inputs(n: int, shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    """n made-up samples of `shape` when no data is given: standard normal floats, or, for an integer
    type (pixels, samples), whole numbers anywhere in its range."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind in "iu":
        limits = np.iinfo(dtype)
        return rng.integers(limits.min, int(limits.max) + 1, (n, *shape)).astype(dtype)
    return rng.standard_normal((n, *shape)).astype(dtype)


def check_integers(arr: Any, dtype: np.dtype, path: str | Path, what: str = "--data",
                   chunk: int = _CHUNK_ROWS) -> None:
    """That every value of `arr` is a whole number `dtype` holds (a uint8 teacher's pixels: 0 to 255),
    read a chunk of rows at a time; DataError naming the file, the first bad value and its row if
    not. An array of an integer type that fits needs no pass over it."""
    info = np.iinfo(dtype)
    if arr.dtype.kind in "iu" and np.iinfo(arr.dtype).min >= info.min and np.iinfo(arr.dtype).max <= info.max:
        return
    for a in range(0, len(arr), chunk):
        rows = np.asarray(arr[a : a + chunk])
        flat = rows.reshape(len(rows), -1)
        bad = (flat < info.min) | (flat > info.max)
        if arr.dtype.kind == "f":
            bad |= np.floor(flat) != flat
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DataError(f"{what} {path}: the teacher takes {dtype.name} inputs (whole numbers from "
                            f"{info.min} to {info.max}), but row {a + r} holds {flat[r, c].item()!r}")


def load_labels(path: str | Path, n_samples: int, *, what: str = "--eval-labels",
                data_what: str = "--eval-data") -> np.ndarray:
    """Integer class labels, one per sample: shape (N,) or (N, 1)."""
    arr = np.asarray(load_array(path, what=what))
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{what} {path}: expected one label per sample, got shape {arr.shape}")
    if arr.shape[0] != n_samples:
        raise DataError(
            f"{what} {path}: has {arr.shape[0]} labels but {data_what} has {n_samples} samples"
        )
    whole = arr.dtype.kind != "f" or (np.isfinite(arr).all() and np.equal(np.round(arr), arr).all())
    if not whole:
        raise DataError(f"{what} {path}: labels must be whole class numbers")
    if (arr < 0).any():
        raise DataError(f"{what} {path}: labels must be class numbers >= 0")
    return arr.astype(np.int64)


def check_key(key: str | None, *paths: str | Path | None) -> None:
    """--key picks an array inside an .npz: given with no .npz among the data files, it would be
    ignored silently, so it is refused."""
    if key is not None and not any(p is not None and Path(p).suffix.lower() == ".npz" for p in paths):
        names = ", ".join(str(p) for p in paths if p is not None)
        raise DataError(f"--key: picks an array inside an .npz file, and none is given ({names})")
