"""Scaling while training, and folding it back: inputs standardized per feature (robustly), targets
centred per class and scaled to unit spread; after training both are folded into the student's
weights (or, for a convolutional student, into its `norm` layer), so that the saved student takes raw
inputs and gives raw logits. Statistics are read a chunk of rows at a time in float64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn


def _fold(model: nn.Sequential, mu: np.ndarray, sd: np.ndarray, z_mean: np.ndarray,
          z_scale: float) -> None:
    """Fold x' = (x - mu) / sd into the first layer and z = s * z_scale + z_mean into the last."""
    import torch

    with torch.no_grad():
        if hasattr(model, "norm"):  # a convolutional student standardizes inside the model: exact
            if hasattr(model, "transpose"):  # mu, sd in the data's channels-last order; the norm's first
                mu, sd = (np.moveaxis(a.reshape(model.transpose.shape), -1, 0).reshape(-1) for a in (mu, sd))
            model.norm.mean.copy_(torch.from_numpy(mu).float().view_as(model.norm.mean))
            model.norm.scale.copy_(torch.from_numpy(1.0 / sd).float().view_as(model.norm.scale))
            mu, sd = np.zeros_like(mu[:0]), np.ones_like(sd[:0])
        out = model.out
        out.weight.mul_(z_scale)
        out.bias.copy_(out.bias.double() * z_scale + torch.from_numpy(z_mean).double())
        if hasattr(model, "norm") or hasattr(model, "embed"):  # nothing was standardized on the input side
            return
        first = model.bottleneck if hasattr(model, "bottleneck") else model.hidden
        w = first.weight.double() / torch.from_numpy(sd).double()  # (out, D)
        shift = w @ torch.from_numpy(mu).double()  # (out,): what the mean subtraction contributed
        first.weight.copy_(w)
        h = model.hidden
        if first is h:
            h.bias.copy_(h.bias.double() - shift)
        else:
            h.bias.copy_(h.bias.double() - h.weight.double() @ shift)


CONSTANT_BELOW = 1e-4  # a feature whose spread is below this fraction of the typical one is constant
SPREAD_FLOOR = 1.0  # features are divided by at least this fraction of the typical spread


def robust_scale(sd: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-feature divisors for standardization, and how many features are ignored.

    Dividing by each feature's own spread blows up on real images: a border pixel that is blank in all
    but a few transfer images has a spread of ~1e-5 to ~1e-2, so a held-out image with ink there gives
    standardized inputs of hundreds to 1e5, and folding 1/sd back into the first layer makes float32
    weights of that size, whose products cancel badly (the export then disagrees with the torch
    student). So, against the typical spread (the root mean square of all features' spreads): a feature
    below CONSTANT_BELOW of it carries nothing the student could learn from and is ignored (divisor inf:
    its weights fold to exact zeros, and any value it takes later changes nothing); the others are
    divided by their spread, but never by less than SPREAD_FLOOR x the typical one, so standardization
    only ever shrinks a wide feature and never magnifies a faint one. (Floors of 0.01, 0.1 and 0.3 left
    a student at 49%, 67% and 85% on held-out digits with ink on a border blank in all but 3 of 1,200
    transfer images, against 98% for the teacher: tests/test_real_data.py; 1.0 matches the teacher.)"""
    typical = float(np.sqrt(np.mean(sd**2))) if sd.size else 0.0
    if not typical > 0:  # every feature constant: nothing to learn from, nothing to scale
        return np.ones_like(sd), 0
    constant = sd < CONSTANT_BELOW * typical
    out = np.maximum(sd, SPREAD_FLOOR * typical)
    out[constant] = np.inf
    return out, int(constant.sum())


def per_channel(mu: np.ndarray, sd: np.ndarray, shape: tuple[int, ...],
                channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature moments -> each channel's mean and spread over all its positions, repeated to one
    value per feature, in the features' own order. Channels first: (C, H, W) or (C, L); (L,) is one
    channel; with `channels_last`, (H, W, C) or (L, C)."""
    if channels_last:
        axis, c = 0, shape[-1]
        m, v = mu.reshape(-1, c), (sd**2).reshape(-1, c)  # (positions, C)
    else:
        axis, c = 1, shape[0] if len(shape) > 1 else 1
        m, v = mu.reshape(c, -1), (sd**2).reshape(c, -1)  # (C, positions)
    mean = m.mean(axis=axis, keepdims=True)
    var = np.maximum((v + m**2).mean(axis=axis, keepdims=True) - mean**2, 0.0)
    return (np.broadcast_to(mean, m.shape).reshape(-1).copy(),
            np.broadcast_to(np.sqrt(var), m.shape).reshape(-1).copy())


def _moments(x: Any, d: int, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and sd of x viewed as (N, d), read in chunks of rows (float64 sums)."""
    n = len(x)
    s1, s2 = np.zeros(d), np.zeros(d)
    for a in range(0, n, chunk):
        b = np.asarray(x[a : a + chunk], dtype=np.float64).reshape(-1, d)
        s1 += b.sum(axis=0)
        s2 += (b * b).sum(axis=0)
    mean = s1 / n
    return mean, np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))


def standardize(x: Any, mean: np.ndarray, sd: np.ndarray, start: int = 0, stop: int | None = None,
                chunk: int = 16_384) -> np.ndarray:
    """(x[start:stop] - mean) / sd as a new float32 (rows, mean.size) array. `x` is anything sliceable by
    rows (an array, a memory map, `Rows`), read a chunk of rows at a time: the result and one chunk are
    all the memory it takes (a whole-array float64 expression took 4x the data in temporaries)."""
    stop = len(x) if stop is None else stop
    out = np.empty((stop - start, mean.size), dtype=np.float32)
    mean32, inv32 = mean.astype(np.float32), (1.0 / sd).astype(np.float32)
    for a in range(start, stop, chunk):
        block = out[a - start : min(stop, a + chunk) - start]
        rows = np.asarray(x[a : a + len(block)]).reshape(len(block), mean.size)
        np.subtract(rows, mean32, out=block, dtype=np.float32, casting="unsafe")
        block *= inv32
    return out
