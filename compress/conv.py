"""A convolutional student's front in torch: convolution + ReLU and max pooling on channels-last
activations, (N, *spatial, C), with hand-written backward passes.

Why not nn.Conv1d / nn.MaxPool1d: profiled on this project's 2-core CPU (torch 2.13, the MNIST-1D
student 32c5-p-64c5-p-64L-1k at batch 256), max_pool*_with_indices took 29% of a training step,
convolution_backward 19% and the convolution 10%, while the products of the linear layers took 10%:
at these sizes (40 positions, 1 to 64 channels) the library kernels are bound by their own overhead.
Here a convolution is one matrix product over all positions at once, (N * positions, K^d * C_in) x
(K^d * C_in, C_out) (im2col on channels-last activations: the K^d windows of a position are one
contiguous row), with the bias and ReLU applied in place; its backward is two products and K^d
shifted adds. Pooling is a max over a reshaped view, one spatial axis at a time, its backward one
scatter. Same results as the library ops (tests/test_conv.py checks values and gradients against
them, borders and odd lengths included), same weights: the parameters keep nn.Conv's layout
(C_out, C_in, *K), so `student.pt`, the ONNX writer and quantization read them unchanged.
Ties in a pooling window send the gradient to the first maximum in row-major order, as torch's
MaxPool does.

Under CUDA autocast the products run in bf16 (custom_fwd / custom_bwd keep backward in the same
autocast state as forward).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _windows(x: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, *S, C) -> (x zero-padded by kernel // 2 on each spatial side, the K^d windows of every
    position as rows (N * prod(S), K^d * C), a copy)."""
    d, p = x.dim() - 2, kernel // 2
    xp = F.pad(x, (0, 0) + (p, p) * d)  # pads the last axis first: C by nothing, then the spatial axes
    st = xp.stride()
    spatial = x.shape[1:-1]
    view = xp.as_strided((x.shape[0], *spatial, *(kernel,) * d, x.shape[-1]),
                         (st[0], *st[1:-1], *st[1:-1], st[-1]))
    return xp, view.reshape(x.shape[0] * math.prod(spatial), kernel**d * x.shape[-1])


class _ConvReLU(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, kernel: int) -> torch.Tensor:
        xp, cols = _windows(x, kernel)
        out = torch.addmm(bias, cols, w).clamp_min_(0.0)  # (N * prod(S), C_out)
        out = out.view(*x.shape[:-1], w.shape[1])
        ctx.save_for_backward(cols, w, out)
        ctx.kernel, ctx.padded_shape = kernel, xp.shape
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        cols, w, out = ctx.saved_tensors
        g = g.contiguous()  # flatten's backward hands over a permuted view; products on it ran 2.5x slower
        g = torch.ops.aten.threshold_backward(g, out, 0).reshape(-1, w.shape[1])  # ReLU's gradient
        gx = None
        if ctx.needs_input_grad[0]:  # col2im: each window's gradient back onto the padded input
            k, shape = ctx.kernel, ctx.padded_shape
            d, spatial = len(shape) - 2, out.shape[1:-1]
            gcols = torch.mm(g, w.t().contiguous()).view(shape[0], *spatial, *(k,) * d, shape[-1])
            gxp = torch.zeros(shape, dtype=gcols.dtype, device=gcols.device)
            for offset in _offsets(k, d):
                target = gxp[(slice(None), *(slice(o, o + n) for o, n in zip(offset, spatial)))]
                target += gcols[(slice(None), *(slice(None),) * d, *offset)]
            p = k // 2
            gx = gxp[(slice(None), *(slice(p, p + n) for n in spatial))]
        gw = torch.mm(cols.t(), g) if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


@functools.cache
def _offsets(kernel: int, d: int) -> tuple[tuple[int, ...], ...]:
    import itertools

    return tuple(itertools.product(range(kernel), repeat=d))


class _MaxPoolAxis(torch.autograd.Function):
    """Max over windows of `window` positions (stride `window`, the remainder dropped) along one axis,
    as a chain of pairwise maxima: running = max(running, y_j). Backward walks the chain back; the
    gradient goes to y_j where it beat the running maximum strictly, else further back, so a tie goes
    to the first maximum. Only float element-wise passes (threshold_backward, subtraction): on this
    CPU a max over a small reduced axis with indices, and masks of bools, ran 10 to 40x slower."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, axis: int, window: int) -> torch.Tensor:
        n = x.shape[axis] // window
        y = x.narrow(axis, 0, n * window).unflatten(axis, (n, window))
        out, beats = y.select(axis + 1, 0), []
        for j in range(1, window):
            yj = y.select(axis + 1, j)
            beats.append(yj - out)  # > 0 where y_j takes over
            out = torch.maximum(out, yj)
        ctx.save_for_backward(*beats)
        ctx.axis, ctx.length = axis, x.shape[axis]
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        axis, length = ctx.axis, ctx.length
        g, parts = g.contiguous(), []
        for d in reversed(ctx.saved_tensors):
            gj = torch.ops.aten.threshold_backward(g, d, 0)  # g where d > 0, else 0
            parts.append(gj)
            g = g - gj
        parts.append(g)
        gx = torch.stack(parts[::-1], dim=axis + 1).flatten(axis, axis + 1)
        if gx.shape[axis] < length:  # the dropped remainder gets no gradient
            pad = [0, 0] * (gx.dim() - 1 - axis) + [0, length - gx.shape[axis]]
            gx = F.pad(gx, pad)
        return gx, None, None


class ConvReLU(nn.Module):
    """Convolution (stride 1, same padding, odd kernel) + ReLU, (N, *S, C_in) -> (N, *S, C_out);
    `weight` (C_out, C_in, *K) and `bias` (C_out,) as nn.Conv1d/2d hold them."""

    def __init__(self, in_channels: int, filters: int, kernel: int, dims: int) -> None:
        super().__init__()
        self.kernel, self.dims = kernel, dims
        ref = (nn.Conv2d if dims == 2 else nn.Conv1d)(in_channels, filters, kernel)  # its initialization
        self.weight, self.bias = nn.Parameter(ref.weight.detach()), nn.Parameter(ref.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (C_out, C_in, *K) -> (K^d * C_in, C_out), rows in the order of a window's (*K, C_in)
        w = self.weight.permute(*range(2, 2 + self.dims), 1, 0).reshape(-1, self.weight.shape[0])
        return _ConvReLU.apply(x, w, self.bias, self.kernel)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel={self.kernel}, channels last"


class MaxPool(nn.Module):
    """Max pooling, window and stride `window` on every spatial axis, (N, *S, C) -> (N, *S // w, C)."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window == 1:
            return x
        # the last spatial axis first: a tie then goes to the first maximum in row-major order
        for axis in range(x.dim() - 2, 0, -1):
            x = _MaxPoolAxis.apply(x, axis, self.window)
        return x

    def extra_repr(self) -> str:
        return f"window={self.window}, channels last"


class ChannelsFirstFlatten(nn.Module):
    """(N, *S, C) -> (N, C * prod(S)) in channels-first order: the order of the ONNX graph's Flatten
    of (N, C, *S), which the bottleneck's weights follow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(-1, 1).reshape(x.shape[0], -1)
