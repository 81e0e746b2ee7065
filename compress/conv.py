"""A convolutional student's front in torch, on channels-last activations (N, *spatial, C): convolution
+ ReLU through torch's channels_last kernels, and max pooling with a hand-written backward.

Why not nn.Conv1d + nn.MaxPool1d on (N, C, L): profiled on this project's 2-core CPU (torch 2.13, the
MNIST-1D student 32c5-p-64c5-p-64L-1k at batch 256), max_pool*_with_indices took 29% of a training
step, convolution_backward 19% and the convolution 10%, while the linear layers' products took 10%.
Channels last, a 1-D convolution runs as a 2-D one of height 1 on the same bytes (oneDNN's channels_last
kernels; 1-D has none), and pooling is a chain of pairwise maxima over a reshaped view. Measured in one
process, alternating (fit steps at batch 256): 32c5-p-64c5-p-64L-1k 11.2 -> 7.2 ms a step, 64c5-p-32L-2k
9.2 -> 6.4 ms; an im2col convolution (one product over all positions, hand-written backward) was slower
on the two-layer student (1.26-1.71x the step time), torch.compile slower still (19.6 ms), and data
parallel Python threads slower than torch's own two (the GIL).

The weights keep nn.Conv's layout (C_out, C_in, *K), so `student.pt`, the ONNX writer and
quantization read them unchanged; tests/test_conv.py checks values and every gradient against
F.conv*d / relu / max_pool*d, ties in pooling windows included (the gradient goes to the first maximum
in row-major order, as torch's MaxPool sends it). On a GPU the same code runs under bf16 autocast.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class _MaxPoolAxis(torch.autograd.Function):
    """Max over windows of `window` positions (stride `window`, the remainder dropped) along one axis,
    as a chain of pairwise maxima: running = max(running, y_j). Backward walks the chain back; the
    gradient goes to y_j where it beat the running maximum strictly, else further back, so a tie goes
    to the first maximum. Only float element-wise passes (threshold_backward, subtraction): on this
    CPU a max over a small reduced axis with indices, and masks of bools, ran 10 to 40x slower."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, axis: int, window: int, relu: bool) -> torch.Tensor:
        n = x.shape[axis] // window
        y = x.narrow(axis, 0, n * window).unflatten(axis, (n, window))
        out, beats = y.select(axis + 1, 0), []
        for j in range(1, window):
            yj = y.select(axis + 1, j)
            beats.append(yj - out)  # > 0 where y_j takes over
            out = torch.maximum(out, yj)
        if relu:  # the convolution's ReLU after the max: relu(max) = max(relu), on 1/window of the data
            out = out.clamp_min_(0.0)  # a result of torch.maximum: window >= 2 here (MaxPool)
        ctx.save_for_backward(out if relu else None, *beats)
        ctx.axis, ctx.length = axis, x.shape[axis]
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        axis, length = ctx.axis, ctx.length
        out, *beats = ctx.saved_tensors
        g, parts = g.contiguous(), []
        if out is not None:
            g = torch.ops.aten.threshold_backward(g, out, 0)
        for d in reversed(beats):
            gj = torch.ops.aten.threshold_backward(g, d, 0)  # g where d > 0, else 0
            parts.append(gj)
            g = g - gj
        parts.append(g)
        gx = torch.stack(parts[::-1], dim=axis + 1).flatten(axis, axis + 1)
        if gx.shape[axis] < length:  # the dropped remainder gets no gradient
            pad = [0, 0] * (gx.dim() - 1 - axis) + [0, length - gx.shape[axis]]
            gx = F.pad(gx, pad)
        return gx, None, None, None


class Conv(nn.Module):
    """Convolution (stride 1, same padding, odd kernel) and, unless `relu` is False (a pooling layer
    right after applies it), its ReLU: (N, *S, C_in) -> (N, *S, C_out); `weight` (C_out, C_in, *K) and
    `bias` (C_out,) as nn.Conv1d/2d hold them."""

    def __init__(self, in_channels: int, filters: int, kernel: int, dims: int, relu: bool = True) -> None:
        super().__init__()
        self.kernel, self.dims, self.relu = kernel, dims, relu
        ref = (nn.Conv2d if dims == 2 else nn.Conv1d)(in_channels, filters, kernel)  # its initialization
        self.weight, self.bias = ref.weight, ref.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf, w = x.movedim(-1, 1), self.weight  # (N, C, *S) in channels_last memory: the same bytes
        if self.dims == 1:  # as a 2-D convolution of height 1: 1-D has no channels_last kernels
            xf, w = xf.unsqueeze(2), w.unsqueeze(2)
        p = self.kernel // 2
        y = F.conv2d(xf, w, self.bias, padding=(0, p) if self.dims == 1 else p)
        y = (y.squeeze(2) if self.dims == 1 else y).movedim(1, -1)  # (N, *S, C), contiguous
        # the ReLU on that view: its backward then meets a gradient of the same layout (on the 4-D
        # channels_last view it ran 8x slower, 0.55 ms a call)
        return y.relu_() if self.relu else y

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel={self.kernel}, channels last"
                + ("" if self.relu else ", ReLU after the pooling"))


class MaxPool(nn.Module):
    """Max pooling, window and stride `window` on every spatial axis, (N, *S, C) -> (N, *S // w, C);
    with `relu`, the ReLU of the convolution before it, applied after the max (the same values and
    gradients, on 1/window^d of the activations: on this CPU's memory bandwidth the full-size passes
    of a separate ReLU cost more than the convolution's arithmetic)."""

    def __init__(self, window: int, relu: bool = False) -> None:
        super().__init__()
        self.window, self.relu = window, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window == 1:
            return x.relu() if self.relu else x
        # the last spatial axis first: a tie then goes to the first maximum in row-major order
        for axis in range(x.dim() - 2, 0, -1):
            x = _MaxPoolAxis.apply(x, axis, self.window, self.relu and axis == 1)
        return x

    def extra_repr(self) -> str:
        return f"window={self.window}, channels last" + (", then ReLU" if self.relu else "")


class ChannelsFirstFlatten(nn.Module):
    """(N, *S, C) -> (N, C * prod(S)) in channels-first order: the order of the ONNX graph's Flatten
    of (N, C, *S), which the bottleneck's weights follow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(-1, 1).reshape(x.shape[0], -1)
