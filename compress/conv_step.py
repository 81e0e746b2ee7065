"""The CPU training step for convolutional students: the batch split across cores, one thread each,
no autograd.

Why it exists: a conv student's products are small (inner sizes of 5 to a few hundred, 32 to 64
outputs), so torch's two-thread ops spend much of a step meeting at every op, and every activation of
a 256-row batch (about 1.3 MB for the MNIST-1D students) misses the cores' caches on each of the many
element-wise passes (ReLU, pooling and their backwards). Here each of the N threads runs the whole
forward and backward on its own rows with single-threaded ops, on activations that stay in its own
core's cache; the threads meet twice a step: once to sum the weight gradients (a few hundred KB), and
once when the next step starts. Measured on this project's 2-core CPU: see benchmarks/train_throughput.py.

The layers are the student's own modules (compress.student.build_student), interpreted in order; the
convolutions and poolings use the functions behind compress.conv's modules (`conv_forward`,
`conv_backward`, `pool_axis`, `pool_axis_backward`), and the update is `torch.optim.AdamW(fused=True)`'s
kernel on the module's own parameters (tests/test_conv_step.py compares it with autograd + AdamW step by
step). The optimizer object owns the hyperparameters and the learning rate, as for
compress.split_step.SplitStep, whose threads and meetings this step shares (ThreadedStep).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress import conv
from compress.split_step import ThreadedStep, _split


def supported(model: nn.Module) -> bool:
    """Whether this step can train `model`: a student of float inputs with a convolutional front."""
    return hasattr(model, "norm") and hasattr(model, "hidden") and not hasattr(model, "embed")


class ConvStep(ThreadedStep):
    """Forward, backward and AdamW for one batch of a (class-padded, float32, CPU) student with a
    convolutional front, on `threads` threads, each on its share of the batch's rows. Arguments and
    use as compress.split_step.SplitStep."""

    def __init__(self, model: nn.Sequential, opt: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_classes: int,
                 batch_size: int, threads: int, l2: bool = False) -> None:
        if not supported(model):
            raise ValueError("ConvStep: a student of float inputs with a convolutional front is needed")
        self.model, self.opt, self.loss_fn, self.l2 = model, opt, loss_fn, l2
        self.threads, self.c = max(1, threads), num_classes
        self.params = [p.detach() for p in model.parameters()]  # updated in place: the module's own
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.step_count = 0
        self._from_model()
        self._index = {id(p): i for i, p in enumerate(model.parameters())}
        self._layers = list(model.children())
        self.cp = model.out.out_features
        self.loss = torch.zeros(())
        self._losses = [torch.zeros(()) for _ in range(self.threads)]  # each thread's, set each step
        self._d = math.prod(model.norm.mean.shape)
        self._programs: list[dict[tuple[int, int], _Program]] = [{} for _ in range(self.threads)]
        self._zeros, self._zero = [torch.zeros_like(p) for p in self.params], torch.zeros(())
        self._grads: list[list[torch.Tensor]] = [self._zeros] * self.threads
        self._steps = [torch.zeros(()) for _ in range(self.threads)]
        # which parameters each thread sums and updates: round robin, largest first
        order = sorted(range(len(self.params)), key=lambda i: -self.params[i].numel())
        self._owned = [order[j:: self.threads] for j in range(self.threads)]
        self._start_threads()

    # ---- one thread's share of a step ----------------------------------------------------------------
    # A thread's forward and backward are recorded once per row count, as a list of ops that each write
    # a buffer this thread keeps (activations, gradients, views of the module's weights), and replayed
    # every step: the same memory as the last step, still in the core's cache, and no Python beyond
    # one call per op (with two threads, Python's share of a step is what they queue for, the GIL).

    def _program(self, j: int, rows: int, n: int) -> _Program:
        key = (rows, n)
        if key not in self._programs[j]:
            self._programs[j][key] = self._record(rows, n)
        return self._programs[j][key]

    def _record(self, rows: int, n: int) -> _Program:
        bufs: dict[Any, torch.Tensor] = {}

        def alloc(slot: Any) -> conv.Alloc:
            def new(name: str, shape: tuple[int, ...]) -> torch.Tensor:
                return bufs.setdefault((slot, name, shape), torch.zeros(shape))
            return new

        prog = _Program(alloc("io")("x", (rows, self._d)), alloc("io")("t", (rows, self.c)))
        prog.grads = [torch.zeros_like(p) for p in self.params]
        tape, spatial = self._record_forward(prog, alloc, rows)
        self._record_loss(prog, alloc("io"), rows, n)
        self._record_backward(prog, tape, alloc, rows, spatial)
        return prog

    def _record_forward(self, prog: _Program, alloc: Callable[[Any], conv.Alloc],
                        rows: int) -> tuple[list[tuple[Any, ...]], tuple[int, ...]]:
        """The forward's ops into prog.forward; returns the tape the backward walks back, and the
        spatial shape at the flatten."""
        rec, spatial = prog.forward.record, ()
        h, tape = prog.x, []
        for slot, layer in enumerate(self._layers):
            new = alloc(slot)
            if isinstance(layer, conv.Conv):
                y = new("y", (*h.shape[:-1], layer.weight.shape[0]))
                first = not tape  # its input is the data: one product over the im2col matrix
                if first:
                    cols = conv.first_conv_buffers(h, layer.weight, new)
                    conv.first_conv_forward(h, layer.weight, layer.bias, layer.kernel, cols, y, op=rec)
                else:
                    conv.conv_forward(h, layer.weight, layer.bias, layer.kernel, layer.dims, out=y, op=rec)
                if layer.relu:
                    rec(torch.relu_, y)
                tape.append(("conv", slot, layer, h, y if layer.relu else None, cols if first else None))
                h = y
            elif isinstance(layer, conv.MaxPool):
                if layer.window == 1:
                    if layer.relu:
                        h = rec(torch.clamp_min, h, 0.0, out=new("out", tuple(h.shape)))
                        tape.append(("relu", slot, h))
                    continue
                for axis in range(h.dim() - 2, 0, -1):  # as MaxPool.forward: the last axis first
                    # the backward may write the input's gradient over the input itself where nothing
                    # reads the input after the forward: a convolution's output whose ReLU comes after
                    # the pooling, or this pooling's previous axis (no ReLU there)
                    before = tape[-1] if tape else ("data",)  # a pooling may come first
                    spent = (before[0] == "pool" and before[1][0] == slot) or (
                        before[0] == "conv" and before[4] is None)
                    x_in = h
                    h, saved = conv.pool_axis(h, axis, layer.window, layer.relu and axis == 1,
                                              alloc((slot, axis)), op=rec)
                    tape.append(("pool", (slot, axis), saved, x_in if spent else None))
            elif isinstance(layer, conv.ChannelsFirstFlatten):
                # The next layer's weights follow the channels-first order: reorder the activations
                # to it, or (when the weights are smaller: fewer outputs than rows) those weights to
                # the channels-last order of the activations, which then flatten as they lie.
                following = self._layers[slot + 1]
                reorder = following.out_features < rows
                tape.append(("flatten", slot, tuple(h.shape), reorder))
                if reorder:
                    spatial = tuple(h.shape[1:-1])
                    h = h.reshape(rows, -1)
                else:
                    flat = new("out", (rows, h[0].numel()))
                    rec(torch.Tensor.copy_, flat.view(rows, h.shape[-1], *h.shape[1:-1]), h.movedim(-1, 1))
                    h = flat
            elif isinstance(layer, nn.Linear):
                weight = layer.weight
                if tape[-1][0] == "flatten" and tape[-1][3]:  # channels-last order (see flatten)
                    weight = new("weight", tuple(weight.shape))
                    rec(torch.Tensor.copy_, _channels_last_order(weight, spatial),
                        _channels_last_order(layer.weight, spatial, first=True))
                tape.append(("linear", slot, layer, h, weight))
                out = new("out", (rows, layer.out_features))
                h = (rec(torch.mm, h, weight.t(), out=out) if layer.bias is None
                     else rec(torch.addmm, layer.bias, h, weight.t(), out=out))
            elif isinstance(layer, nn.ReLU):
                h = rec(torch.relu_, h)
                tape.append(("relu", slot, h))
            elif isinstance(layer, (nn.Unflatten, conv.ChannelsFirst)):
                h = layer(h)  # a view
            else:  # the input's standardization, (x - mean) * scale, channels last
                mean, scale = layer.mean, layer.scale
                std = new("std", (rows, *mean.shape))
                seen = h.reshape(rows, *mean.shape)  # the input's own memory, or every replay reads this copy
                if seen.untyped_storage().data_ptr() != prog.x.untyped_storage().data_ptr():
                    raise RuntimeError("ConvStep: the standardization must read the input buffer itself")
                rec(torch.sub, seen, mean, out=std)
                rec(torch.Tensor.mul_, std, scale)
                h = std
                if std.dim() > 2:
                    h = new("cl", (rows, *mean.shape[1:], mean.shape[0]))
                    rec(torch.Tensor.copy_, h, std.movedim(1, -1))
        prog.logits = h
        return tape, spatial


    def _record_loss(self, prog: _Program, io: conv.Alloc, rows: int, n: int) -> None:
        """The L2 loss and its gradient into prog.loss (any other loss's is written by _work)."""
        prog.dy = dy = io("dy", (rows, self.cp))  # padded classes keep a zero gradient
        if self.l2:
            rec = prog.loss.record
            diff = rec(torch.sub, prog.logits[:, : self.c], prog.t, out=io("diff", (rows, self.c)))
            sq = rec(torch.mul, diff, diff, out=io("sq", (rows, self.c)))
            rec(torch.sum, sq, (0, 1), out=prog.loss_value)
            rec(torch.Tensor.mul_, prog.loss_value, 0.5 / n)
            rec(torch.mul, diff, 1.0 / n, out=dy[:, : self.c])


    def _record_backward(self, prog: _Program, tape: list[tuple[Any, ...]],
                         alloc: Callable[[Any], conv.Alloc], rows: int, spatial: tuple[int, ...]) -> None:
        """The backward's ops into prog.backward, from prog.dy to the weight gradients prog.grads."""
        grads = prog.grads
        rec, g = prog.backward.record, prog.dy
        for i, (kind, slot, *rest) in enumerate(reversed(tape)):
            last = i == len(tape) - 1  # the first layer: its input is the data, which needs no gradient
            new = alloc(("grad", slot))
            if kind == "linear":
                layer, h, weight = rest
                gw = grads[self._index[id(layer.weight)]]
                if weight is not layer.weight:  # in channels-last order: back to the module's
                    rec(torch.mm, g.t(), h, out=new("gw", tuple(gw.shape)))
                    rec(torch.Tensor.copy_, _channels_last_order(gw, spatial, first=True),
                        _channels_last_order(new("gw", tuple(gw.shape)), spatial))
                else:
                    rec(torch.mm, g.t(), h, out=gw)
                if layer.bias is not None:
                    rec(torch.sum, g, 0, out=grads[self._index[id(layer.bias)]])
                if not last:
                    g = rec(torch.mm, g, weight, out=new("g", (rows, layer.in_features)))
            elif kind == "relu":  # g is a buffer of this program's own: in place
                g = rec(_threshold_backward, g, rest[0], 0, grad_input=g)
            elif kind == "flatten":
                shape, reorder = rest
                if reorder:
                    g = g.view(shape)
                else:
                    gc = new("g", shape)
                    rec(torch.Tensor.copy_, gc.movedim(-1, 1), g.view(rows, shape[-1], *shape[1:-1]))
                    g = gc
            elif kind == "pool":
                saved, spent = rest
                g_in = g  # a buffer of this program's own: the ReLU's mask is applied in place

                def reuse(name: str, shape: tuple[int, ...], new: conv.Alloc = new, g_in: torch.Tensor = g_in,
                          spent: torch.Tensor | None = spent) -> torch.Tensor:
                    if name == "g_relu":
                        return g_in
                    if name == "gx" and spent is not None:
                        return spent
                    return new(name, shape)

                g = conv.pool_axis_backward(g, saved, reuse, op=rec)
            else:  # conv
                layer, h, y, cols = rest
                if y is not None:
                    rec(_threshold_backward, g, y, 0, grad_input=g)
                gw, gb = grads[self._index[id(layer.weight)]], grads[self._index[id(layer.bias)]]
                if cols is not None:
                    conv.first_conv_backward(g, layer.weight, cols, gw, gb, op=rec)
                else:
                    outs = (new("gx", tuple(h.shape)), gw, gb)
                    g = conv.conv_backward(g, h, layer.weight, layer.kernel, layer.dims, True, outs,
                                           op=rec)[0]

    @torch.no_grad()
    def _work(self, j: int, x: torch.Tensor, z: torch.Tensor, idx: torch.Tensor, step: int, lr: float,
              betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        n = idx.shape[0]
        mine = idx[_split(n, j, self.threads)]
        rows = len(mine)
        if rows:
            prog = self._program(j, rows, n)
            torch.index_select(x, 0, mine, out=prog.x)
            torch.index_select(z, 0, mine, out=prog.t)
            prog.forward.run()
            if self.l2:
                prog.loss.run()
            else:  # loss_fn is a mean over its rows: this thread's share of the batch's mean
                with torch.enable_grad():
                    s = prog.logits[:, : self.c].detach().requires_grad_(True)
                    loss = self.loss_fn(s, prog.t) * (rows / n)
                    loss.backward()
                prog.loss_value.copy_(loss.detach())
                prog.dy[:, : self.c] = s.grad
            prog.backward.run()
            self._grads[j], self._losses[j] = prog.grads, prog.loss_value
        else:  # a batch shorter than the threads: this one adds nothing
            self._grads[j], self._losses[j] = self._zeros, self._zero
        self._barrier.wait()

        if j == 0:
            torch.sum(torch.stack(self._losses), 0, out=self.loss)
        own = self._owned[j]
        if not own:
            return
        total = [self._grads[0][i] for i in own]  # each thread sums the gradients it owns into thread 0's
        for other in self._grads[1:]:
            torch._foreach_add_(total, [other[i] for i in own])
        self._steps[j].fill_(step)  # this thread's copy: the caller may be posting the next step already
        torch._fused_adamw_([self.params[i] for i in own], total, [self.m[i] for i in own],
                            [self.v[i] for i in own], [], [self._steps[j]] * len(own), amsgrad=False,
                            lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps,
                            maximize=False)


_threshold_backward = torch.ops.aten.threshold_backward.grad_input


def _channels_last_order(w: torch.Tensor, spatial: tuple[int, ...], first: bool = False) -> torch.Tensor:
    """w (out, S*C), whose columns run over positions then channels (or, `first`, (out, C*S) over
    channels then positions, as the module holds it), as an (out, C, *S) view."""
    c = w.shape[1] // math.prod(spatial)
    return w.view(w.shape[0], c, *spatial) if first else w.view(w.shape[0], *spatial, c).movedim(-1, 1)


class _Ops:
    """A recorded list of ops: `record(f, *args, **kwargs)` appends one and returns what it will write
    (its `out`/`grad_input` argument, its three outputs, or, for an in-place method, its tensor)."""

    def __init__(self) -> None:
        self.ops: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def record(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.ops.append((f, args, kwargs))
        if "out0" in kwargs:
            return kwargs["out0"], kwargs["out1"], kwargs["out2"]
        return kwargs.get("out", kwargs.get("grad_input", args[0]))

    def run(self) -> None:
        for f, args, kwargs in self.ops:
            f(*args, **kwargs)


class _Program:
    """One thread's step for a given number of rows: its inputs, ops and buffers."""

    def __init__(self, x: torch.Tensor, t: torch.Tensor) -> None:
        self.x, self.t = x, t
        self.forward, self.loss, self.backward = _Ops(), _Ops(), _Ops()
        self.loss_value = torch.zeros(())
        self.logits = self.dy = x
        self.grads: list[torch.Tensor] = []
