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

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Alloc = Callable[[str, tuple[int, ...]], torch.Tensor]  # (name, shape) -> a tensor to write
Op = Callable[..., Any]  # op(f, *args, **kwargs): run f now, or record it (compress.conv_step)
_threshold_backward = torch.ops.aten.threshold_backward.grad_input


def now(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return f(*args, **kwargs)


def pool_axis(x: torch.Tensor, axis: int, window: int, relu: bool, new: Alloc | None = None,
              op: Op = now) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """Max over windows of `window` >= 2 positions (stride `window`, the remainder dropped) along one
    axis, as a chain of pairwise maxima: running = max(running, y_j); with `relu`, then the ReLU.
    Returns the result and what `pool_axis_backward` needs. Every tensor it writes comes from `new`
    and every op goes through `op`, each writing a tensor it is given, so that compress.conv_step can
    record the ops once on buffers it keeps and replay them each step. Backward walks the chain back;
    the gradient goes to y_j where it beat the running maximum strictly, else further back, so a tie
    goes to the first maximum. Only float element-wise passes (threshold_backward, subtraction): on
    this CPU a max over a small reduced axis with indices, and masks of bools, ran 10 to 40x slower."""
    new = new or (lambda name, shape: x.new_empty(shape))
    n = x.shape[axis] // window
    y = x.narrow(axis, 0, n * window).unflatten(axis, (n, window))
    running = y.select(axis + 1, 0)
    out = new("out", tuple(running.shape))
    beats = []
    for j in range(1, window):
        yj = y.select(axis + 1, j)
        beats.append(op(torch.sub, yj, running, out=new(f"beat{j}", tuple(out.shape))))  # > 0: y_j wins
        op(torch.maximum, running, yj, out=out)
        running = out
    if relu:  # the convolution's ReLU after the max: relu(max) = max(relu), on 1/window of the data
        op(torch.Tensor.clamp_min_, out, 0.0)
    return out, (out if relu else None, beats, axis, tuple(x.shape))


def pool_axis_backward(g: torch.Tensor, saved: tuple[Any, ...], new: Alloc | None = None,
                       op: Op = now) -> torch.Tensor:
    out, beats, axis, shape = saved
    new = new or (lambda name, shape: g.new_empty(shape))
    if out is not None:
        g = op(_threshold_backward, g, out, 0, grad_input=new("g_relu", tuple(g.shape)))
    gx = new("gx", shape)
    window = len(beats) + 1
    n = shape[axis] // window
    gv = gx.narrow(axis, 0, n * window).unflatten(axis, (n, window))
    rest = new("g_rest", tuple(g.shape)) if window > 2 else None
    for j in range(window - 1, 0, -1):
        slot = gv.select(axis + 1, j)
        op(_threshold_backward, g, beats[j - 1], 0, grad_input=slot)  # g where y_j won, else 0
        g = op(torch.sub, g, slot, out=gv.select(axis + 1, 0) if j == 1 else rest)  # what is left
    if n * window < shape[axis]:  # the dropped remainder gets no gradient
        op(torch.Tensor.zero_, gx.narrow(axis, n * window, shape[axis] - n * window))
    return gx


class _MaxPoolAxis(torch.autograd.Function):
    """`pool_axis` for autograd."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, axis: int, window: int, relu: bool) -> torch.Tensor:
        out, (relu_out, beats, ctx.axis, ctx.shape) = pool_axis(x, axis, window, relu)
        ctx.save_for_backward(relu_out, *beats)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        out, *beats = ctx.saved_tensors
        return pool_axis_backward(g, (out, beats, ctx.axis, ctx.shape)), None, None, None


def _conv_args(x: torch.Tensor, weight: torch.Tensor, kernel: int, dims: int) -> tuple[Any, ...]:
    """(N, *S, C) activations and the (C_out, C_in, *K) weight as torch's 2-D convolution takes them:
    (N, C, *S) in channels_last memory (the same bytes); a 1-D convolution as a 2-D one of height 1
    (1-D has no channels_last kernels). Returns them and the padding."""
    xf = x.movedim(-1, 1)
    if dims == 1:
        return xf.unsqueeze(2), weight.unsqueeze(2), [0, kernel // 2]
    return xf, weight, [kernel // 2] * 2


def _conv_result(y: torch.Tensor, dims: int) -> torch.Tensor:
    return (y.squeeze(2) if dims == 1 else y).movedim(1, -1)  # (N, *S, C), contiguous


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel: int, dims: int,
                 out: torch.Tensor | None = None, op: Op = now) -> torch.Tensor:
    """Convolution, stride 1, same padding: (N, *S, C_in) -> (N, *S, C_out), no autograd; into `out`
    (through `op`, as `pool_axis`) when given."""
    xf, w, pad = _conv_args(x, weight, kernel, dims)
    args = (xf, w, bias, [1, 1], pad, [1, 1], False, [0, 0], 1)
    if out is None:
        return _conv_result(torch.ops.aten.convolution(*args), dims)
    op(torch.ops.aten.convolution.out, *args, out=_conv_args(out, weight, kernel, dims)[0])
    return out


def conv_backward(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kernel: int, dims: int,
                  input_grad: bool, outs: tuple[torch.Tensor, ...] | None = None,
                  op: Op = now) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The gradients of `conv_forward` for output gradient g: input (if `input_grad`), weight, bias;
    with `outs` (input, weight and bias gradients to write, shaped as x, weight and bias), into them
    through `op` (the input's is always computed then)."""
    xf, w, pad = _conv_args(x, weight, kernel, dims)
    gf = _conv_args(g, weight, kernel, dims)[0]
    args = (gf, xf, w, [w.shape[0]], [1, 1], pad, [1, 1], False, [0, 0], 1)
    if outs is None:
        gx, gw, gb = torch.ops.aten.convolution_backward(*args, [input_grad, True, True])
        return (_conv_result(gx, dims) if input_grad else None), gw.contiguous().view(weight.shape), gb
    gx, gw, gb = outs
    op(torch.ops.aten.convolution_backward.out, *args, [True, True, True],
       out0=_conv_args(gx, weight, kernel, dims)[0], out1=gw.view(w.shape), out2=gb)
    return gx, gw, gb


def first_conv_buffers(x: torch.Tensor, weight: torch.Tensor, new: Alloc) -> dict[str, torch.Tensor]:
    """Buffers for `first_conv_forward` on input x (N, *S, C_in): the zero-padded input, its windows
    as rows (the im2col matrix), and the weight as a (K^d C_in, C_out) matrix."""
    c_out, c_in, *k = weight.shape
    spatial = tuple(x.shape[1:-1])
    padded = new("padded", (x.shape[0], *(s + kk - 1 for s, kk in zip(spatial, k, strict=True)), c_in))
    padded.zero_()
    rows = math.prod(k) * c_in
    return {"padded": padded, "cols": new("cols", (x.shape[0], *spatial, rows)),
            "w": new("w", (rows, c_out)), "gw": new("gw", (rows, c_out))}


def _windows(padded: torch.Tensor, spatial: tuple[int, ...], kernel: int) -> torch.Tensor:
    """(N, *S, K, ..., C_in): every position's window of the padded input, a strided view."""
    n, *_, c = padded.shape
    strides = padded.stride()
    return padded.as_strided((n, *spatial, *([kernel] * len(spatial)), c),
                             (strides[0], *strides[1:-1], *strides[1:-1], strides[-1]))


def first_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel: int,
                       bufs: dict[str, torch.Tensor], out: torch.Tensor, op: Op = now) -> torch.Tensor:
    """`conv_forward` as one product over the im2col matrix: for the first convolution, whose few input
    channels (1 for MNIST-1D) oneDNN's kernels handle slowly (on this CPU 0.34 ms forward and 0.76 ms
    backward for 128 rows of MNIST-1D's 32c5, against about 0.05 ms here), and whose input needs no
    gradient."""
    spatial, p = tuple(x.shape[1:-1]), kernel // 2
    interior = bufs["padded"]
    for axis in range(1, len(spatial) + 1):
        interior = interior.narrow(axis, p, spatial[axis - 1])
    op(torch.Tensor.copy_, interior, x)
    windows = bufs["cols"].view(x.shape[0], *spatial, *([kernel] * len(spatial)), x.shape[-1])
    op(torch.Tensor.copy_, windows, _windows(bufs["padded"], spatial, kernel))
    w = bufs["w"]  # rows in the order of a window's (k..., c), as the im2col matrix's columns
    dims = len(spatial)
    op(torch.Tensor.copy_, w.view(*([kernel] * dims), weight.shape[1], weight.shape[0]),
       weight.permute(*range(2, 2 + dims), 1, 0))
    op(torch.addmm, bias, bufs["cols"].view(-1, w.shape[0]), w, out=out.view(-1, w.shape[1]))
    return out


def first_conv_backward(g: torch.Tensor, weight: torch.Tensor, bufs: dict[str, torch.Tensor],
                        gw: torch.Tensor, gb: torch.Tensor, op: Op = now) -> None:
    """The weight and bias gradients of `first_conv_forward` for output gradient g, into gw and gb."""
    w, dims = bufs["w"], weight.dim() - 2
    gm, g2 = bufs["gw"], g.view(-1, w.shape[1])
    op(torch.mm, bufs["cols"].view(-1, w.shape[0]).t(), g2, out=gm)
    op(torch.Tensor.copy_, gw.permute(*range(2, 2 + dims), 1, 0),
       gm.view(*weight.shape[2:], *weight.shape[1::-1]))
    op(torch.sum, g2, 0, out=gb)


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
        xf, w, pad = _conv_args(x, self.weight, self.kernel, self.dims)
        y = _conv_result(F.conv2d(xf, w, self.bias, padding=pad), self.dims)
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


class ChannelsFirst(nn.Module):
    """A channels-last sample (N, *S, C), or its flat rows (N, D) as training feeds them, as the
    channels-first (N, C, *S) view the student's layer list and ONNX graph take (no copy)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape).movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"{self.shape} -> channels first"


class ChannelsFirstFlatten(nn.Module):
    """(N, *S, C) -> (N, C * prod(S)) in channels-first order: the order of the ONNX graph's Flatten
    of (N, C, *S), which the bottleneck's weights follow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(-1, 1).reshape(x.shape[0], -1)
