"""Synthetic transfer data, for when the real transfer set is small (`--augment METHOD:FACTOR`).

FACTOR multiplies the training transfer set: `munge:20` adds 19 synthetic samples per real one. The
synthetic samples are labelled by the teacher like real ones. They are written chunk by chunk to a
memory-mapped `.npy`, so memory stays bounded whatever the factor. Inputs of any shape are treated
as flat feature vectors and reshaped back. For a teacher of integer inputs (uint8 pixels) the synthetic
values are rounded and clipped to the type's range, and stored in it.

- munge: Bucila, Caruana & Niculescu-Mizil, "Model Compression" (KDD 2006). For each sample e, its
  nearest neighbour e' (Euclidean, on standardized features; scikit-learn's NearestNeighbors); each
  feature is, with probability p, redrawn from Normal(e'_a, |e_a - e'_a| / s), else kept. p = 0.5 and
  s = 4 here (the paper's continuous-attribute rule; it tunes p and s per data set; on digits with 100
  real samples, (p, s) in {0.3, 0.5, 0.8} x {1, 2, 4} all gave 95.8-97.3%, within run-to-run noise).
- noise: Gaussian jitter, sd = 0.1 x each feature's spread in the real data.
- mixup: convex mixes lam * a + (1 - lam) * b of random pairs, lam ~ Uniform(0, 1).

For token-id teachers (compress.tokens), in the spirit of Tang et al., "Distilling Task-Specific
Knowledge from BERT into Simple Neural Networks" (2019), each synthetic text is a copy of a real one:
- mask: each kept token replaced, with probability MASK_P (their 0.1), by `mask_id` (the tokenizer's
  [MASK] or [UNK] id, which only the user knows: --mask-id);
- ngram: a window of n consecutive tokens, n uniform from 1 to the text's length, moved to the start.
The first and last kept token of every text (a tokenizer's [CLS] and [SEP]) stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from compress.atomic import atomic_path, new_memmap
from compress.errors import ConfigError

METHODS = ("munge", "noise", "mixup", "mask", "ngram")
TOKEN_METHODS = ("mask", "ngram")  # for token-id teachers; the others for float inputs
MASK_P = 0.1  # share of a text's tokens the mask method replaces
MUNGE_P = 0.5  # probability of redrawing a feature
MUNGE_S = 4.0  # spread divisor: the redraw's sd is |e_a - e'_a| / s
NOISE_SCALE = 0.1  # jitter sd as a fraction of each feature's sd
_ROWS = 65_536  # rows generated per chunk


def parse_augment(text: str | None) -> tuple[str, int] | None:
    """'munge:20' -> ('munge', 20); None or '' -> None."""
    if not text:
        return None
    method, _, factor = text.partition(":")
    method = method.strip().lower()
    if method not in METHODS:
        raise ConfigError(f"--augment: '{method}' is not one of {', '.join(METHODS)} (e.g. munge:20)")
    try:
        k = int(factor)
    except ValueError:
        raise ConfigError(f"--augment: '{text}' needs a whole factor, e.g. {method}:10") from None
    if k < 2:
        raise ConfigError(f"--augment: the factor must be at least 2 (the real set times k), got {k}")
    return method, k


def _munge_rows(x: np.ndarray, nn_idx: np.ndarray, rows: np.ndarray, rng: np.random.Generator
                ) -> np.ndarray:
    e, e2 = x[rows], x[nn_idx[rows]]
    redraw = rng.random(e.shape) < MUNGE_P
    spread = np.abs(e - e2) / MUNGE_S
    return np.where(redraw, rng.normal(e2, spread), e)


def _token_rows(x: np.ndarray, rows: np.ndarray, method: str, rng: np.random.Generator,
                names: tuple[str, ...], mask_id: int | None) -> np.ndarray:
    """Synthetic copies of the stacked token rows x[rows] (N, I, L)."""
    from compress.tokens import roles

    r = roles(names)
    s = np.array(x[rows], dtype=np.int64)  # a copy
    m, length = s.shape[0], s.shape[2]
    keep = s[:, r.mask] > 0 if r.mask is not None else np.ones((m, length), dtype=bool)
    first = keep.argmax(axis=1)
    last = length - 1 - keep[:, ::-1].argmax(axis=1)
    inner = keep.copy()
    inner[np.arange(m), first] = False
    inner[np.arange(m), last] = False
    if method == "mask":
        assert mask_id is not None
        ids = s[:, r.ids]
        ids[inner & (rng.random(ids.shape) < MASK_P)] = mask_id
        return s
    out = np.zeros_like(s)
    for i in range(m):  # ngram: the frame and a window of the inner tokens, from position 0
        pos = np.flatnonzero(inner[i])
        if pos.size:
            n = int(rng.integers(1, pos.size + 1))
            start = int(rng.integers(0, pos.size - n + 1))
            pos = pos[start : start + n]
        frame = [int(first[i])] + list(pos) + ([int(last[i])] if last[i] != first[i] else [])
        out[i, :, : len(frame)] = s[i][:, frame]
    return out


def generate(x: np.ndarray, method: str, factor: int, path: str | Path, seed: int = 0,
             progress: Callable[[int, int], None] | None = None, names: tuple[str, ...] = (),
             mask_id: int | None = None) -> np.ndarray:
    """Write (factor - 1) * len(x) synthetic samples shaped like x to `path`; return them memory-mapped.
    Token methods take the stacked token rows and the teacher's input `names`."""
    n = x.shape[0]
    if method in TOKEN_METHODS:
        return _generate_tokens(x, method, factor, path, seed, progress, names, mask_id)
    flat = np.asarray(x, dtype=np.float32).reshape(n, -1)  # (N, D)
    total = (factor - 1) * n
    rng = np.random.default_rng(seed)
    sd = flat.std(axis=0)
    nn_idx = None
    if method == "munge":
        if n < 2:
            raise ConfigError("--augment munge: needs at least 2 real samples")
        from sklearn.neighbors import NearestNeighbors

        z = (flat - flat.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
        nn_idx = NearestNeighbors(n_neighbors=2).fit(z).kneighbors(z, return_distance=False)[:, 1]
    # a teacher of integer inputs (uint8 pixels) gets whole numbers in its type's range, held in that type
    integer = np.iinfo(x.dtype) if x.dtype.kind in "iu" else None
    with atomic_path(path) as tmp:
        out = new_memmap(tmp, (total, *x.shape[1:]), final=path, dtype=x.dtype.name if integer else "float32")
        view = out.reshape(total, -1)
        for start in range(0, total, _ROWS):
            stop = min(total, start + _ROWS)
            rows = np.arange(start, stop) % n  # each pass over the real set yields n new samples
            if method == "munge":
                assert nn_idx is not None
                new = _munge_rows(flat, nn_idx, rows, rng)
            elif method == "noise":
                new = flat[rows] + rng.standard_normal((rows.size, flat.shape[1])) * (NOISE_SCALE * sd)
            else:
                lam = rng.random((rows.size, 1))
                new = lam * flat[rows] + (1 - lam) * flat[rng.integers(0, n, rows.size)]
            if integer is not None:
                new = np.clip(np.rint(new), integer.min, integer.max)
            view[start:stop] = new
            if progress:
                progress(stop, total)
        out.flush()
        del view, out
    return np.load(path, mmap_mode="r")


def _generate_tokens(x: np.ndarray, method: str, factor: int, path: str | Path, seed: int,
                     progress: Callable[[int, int], None] | None, names: tuple[str, ...],
                     mask_id: int | None) -> np.ndarray:
    n, total = x.shape[0], (factor - 1) * x.shape[0]
    rng = np.random.default_rng(seed)
    with atomic_path(path) as tmp:
        out = new_memmap(tmp, (total, *x.shape[1:]), final=path, dtype="int64")
        for start in range(0, total, _ROWS):
            stop = min(total, start + _ROWS)
            out[start:stop] = _token_rows(x, np.arange(start, stop) % n, method, rng, names, mask_id)
            if progress:
                progress(stop, total)
        out.flush()
        del out
    return np.load(path, mmap_mode="r")
