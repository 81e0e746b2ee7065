"""Token-id inputs: teachers that read text as integer arrays [batch, sequence], usually several of them
(`input_ids`, `attention_mask`, `token_type_ids`, any names).

Inside compress such a sample is one int64 array of shape (I, L): the teacher's I inputs stacked in
the teacher's order, L tokens each. The transfer set is then one (N, I, L) array, so that row slicing,
the hold-out split, the logit cache and the batching work on it as on float inputs; `feeds` unstacks a
batch into the named inputs a session takes.

Which input is which, from the names: one whose name has "mask" in it is the attention mask (0 or 1,
1 = a real token); one with "type" or "segment" is ignored by the student (token types); the ids are
the input named like `input_ids` (else the first remaining one). Transfer data: an `.npz` with one
array per teacher input, named like the inputs, all of the same shape (N, L) and an integer dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import DataError, TeacherError

INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass(frozen=True)
class Roles:
    """Positions, in the stacked sample, of the ids and of the attention mask (None: no mask)."""

    ids: int
    mask: int | None


def roles(names: tuple[str, ...], where: str = "TEACHER") -> Roles:
    low = [n.lower() for n in names]
    masks = [i for i, n in enumerate(low) if "mask" in n]
    ignored = {i for i, n in enumerate(low) if "type" in n or "segment" in n} | set(masks)
    named = [i for i, n in enumerate(low) if i not in ignored and "ids" in n]
    rest = [i for i in range(len(names)) if i not in ignored]
    if not rest:
        raise TeacherError(f"{where}: none of its inputs {list(names)} holds token ids (all are masks "
                           "or token types)")
    return Roles(ids=(named or rest)[0], mask=masks[0] if masks else None)


def is_token_input(ort_input: Any) -> bool:
    """An onnxruntime input of integer ids, [batch, sequence]."""
    return ort_input.type in INT_TYPES and len(ort_input.shape) == 2


def names_and_dtypes(inputs: list[Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names and numpy dtypes of a session's integer inputs, in order, as `feeds` takes them."""
    return tuple(i.name for i in inputs), tuple(np.dtype(INT_TYPES[i.type]).name for i in inputs)


def token_teacher(inputs: list[Any]) -> bool:
    """Whether a model's inputs are token ids: all integer [batch, sequence], and either several of them,
    a sequence axis of no fixed length, or a name that says ids or tokens. A single integer input of a
    fixed width named otherwise is integer features, not text (refused: compress wants floats there)."""
    if not inputs or not all(is_token_input(i) for i in inputs):
        return False
    only = inputs[0]
    named = any(w in only.name.lower() for w in ("id", "token"))
    return len(inputs) > 1 or not isinstance(only.shape[1], int) or named


def feeds(names: tuple[str, ...], dtypes: tuple[str, ...], batch: np.ndarray) -> dict[str, np.ndarray]:
    """A stacked batch (N, I, L) as the session's named inputs."""
    return {n: np.ascontiguousarray(batch[:, i]).astype(t, copy=False)
            for i, (n, t) in enumerate(zip(names, dtypes, strict=True))}


def load_npz(path: str | Path, names: tuple[str, ...], what: str = "--data") -> np.ndarray:
    """The stacked (N, I, L) int64 array of an `.npz` holding one array per name, or of a folder of such
    shards (in name order, all with the same L); DataError naming the file and key for anything else."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob("*.npz"))
        if not shards:
            raise DataError(f"{what} {path}: a folder without .npz shards")
        parts = [load_npz(s, names, what) for s in shards]
        for s, part in zip(shards, parts, strict=True):
            if part.shape[2] != parts[0].shape[2]:
                raise DataError(f"{what} {s}: texts of {part.shape[2]} tokens, but {shards[0].name} has "
                                f"{parts[0].shape[2]}; pad every shard to the same length")
        return np.concatenate(parts)
    if path.suffix.lower() != ".npz":
        raise DataError(f"{what} {path}: a token-id teacher (inputs {', '.join(names)}) needs an .npz with "
                        "one integer array per input")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [n for n in names if n not in f.files]
            if missing:
                raise DataError(f"{what} {path}: has no array '{missing[0]}' (the teacher's inputs: "
                                f"{', '.join(names)}; the file holds: {', '.join(f.files) or 'nothing'})")
            arrays = [f[n] for n in names]
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"{what} {path}: not a readable .npz ({type(e).__name__})") from None
    return stack(arrays, names, path, what)


def stack(arrays: list[np.ndarray], names: tuple[str, ...], path: Path, what: str) -> np.ndarray:
    first = arrays[0]
    for n, a in zip(names, arrays, strict=True):
        if not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{what} {path}: '{n}' is {a.dtype}; token ids and masks must be integers")
        if a.ndim != 2:
            raise DataError(f"{what} {path}: '{n}' has shape {a.shape}; expected (samples, tokens)")
        if a.shape[0] != first.shape[0]:
            raise DataError(f"{what} {path}: '{n}' has {a.shape[0]:,} rows but '{names[0]}' has "
                            f"{first.shape[0]:,}")
        if a.shape != first.shape:
            raise DataError(f"{what} {path}: '{n}' has shape {a.shape} but '{names[0]}' has {first.shape}")
        if a.size and int(a.min()) < 0:
            raise DataError(f"{what} {path}: '{n}' holds a negative value ({int(a.min())}); ids are >= 0")
    if first.shape[0] == 0 or first.shape[1] == 0:
        raise DataError(f"{what} {path}: holds no tokens (shape {first.shape})")
    r = roles(names, f"{what} {path}")
    if r.mask is not None and int(arrays[r.mask].max()) > 1:
        raise DataError(f"{what} {path}: '{names[r.mask]}' holds {int(arrays[r.mask].max())}; an "
                        "attention mask holds 0 and 1")
    return np.stack([a.astype(np.int64, copy=False) for a in arrays], axis=1)


def vocab_size(x: np.ndarray, names: tuple[str, ...]) -> int:
    """The largest id in the stacked data, plus one."""
    return int(np.asarray(x[:, roles(names).ids]).max()) + 1
