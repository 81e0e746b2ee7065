"""The CPU training step: the hidden layer split across cores, one thread each, no autograd.

Why it exists: on a CPU, autograd's step for this one architecture spends a third of its time outside
the matmuls' arithmetic: fresh activation and gradient buffers every step, a separate memory pass for
each bias and bias gradient, and multi-threaded BLAS calls that make both cores meet at every op.
Here every buffer is allocated once. Each of the N threads owns H/N hidden units (their rows of the
hidden weights, their rows of the transposed output weights, and the Adam moments of both) and runs
single-threaded BLAS on them; the cores meet at four barriers a step, each over a few hundred KB:
the bottleneck activations, the logits, the logit gradient, and the bottleneck gradient. The hidden
bias rides in the bottleneck matmuls as a column of ones (k padded to a multiple of 16 with it), which
removes its two memory passes and gives the BLAS a friendlier shape.
Each thread works through its hidden units a block at a time (a few thousand units at the paper's
size): the block's ReLU and its backward run on activations still in cache, and its AdamW update runs
right after its gradients are made, from scratch buffers that stay in cache, so the hidden layer's
gradients are never held whole (at 400k units that is 0.7 GB of memory, and two passes over it, less).

The arithmetic is that of `loss.backward()` followed by `torch.optim.AdamW(fused=True)` on the student
(tests/test_split_step.py compares the two step by step); only the order of float sums differs.
The optimizer object still owns the hyperparameters and the learning rate (a scheduler stepping it
drives this step too); `to_model` writes the weights and Adam moments back into the module and the
optimizer's state in their usual layout, so evaluation, checkpoints and resume are the same as
autograd's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

PAD = 16
BLOCK_BYTES = 16 << 20  # the working set of one block of hidden units (see `block`)
_SYNC = ("sync",)  # a job that only waits for the threads


def _split(n: int, j: int, parts: int) -> slice:
    return slice(n * j // parts, n * (j + 1) // parts)


class ThreadedStep:
    """What a CPU training step on its own threads shares: the threads and their meetings, and the
    module <-> step layout of weights and Adam moments. A subclass sets `params`, `m`, `v` (with
    `_views` lining them up with model.parameters()), `loss`, and `_work(j, x, z, idx, step, lr, betas,
    eps, weight_decay)`, thread j's share of a step; then calls `_start_threads()`."""

    model: nn.Module
    opt: torch.optim.Optimizer
    threads: int
    params: list[torch.Tensor]
    m: list[torch.Tensor]
    v: list[torch.Tensor]
    loss: torch.Tensor
    step_count: int

    def _views(self, ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return ts

    def _work(self, j: int, *job: Any) -> None:
        raise NotImplementedError

    def _start_threads(self) -> None:
        nt = self.threads
        self._job: tuple[Any, ...] | None = None
        self._error: BaseException | None = None
        self._barrier = threading.Barrier(nt)
        self._settled = True
        self._saved_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._workers = [threading.Thread(target=self._serve, args=(j,), daemon=True,
                                          name=f"compress-step-{j}") for j in range(1, nt)]
        for w in self._workers:
            w.start()

    @torch.no_grad()
    def _from_model(self) -> None:
        params = list(self.model.parameters())
        for view, p in zip(self._views(self.params), params, strict=True):
            view.copy_(p.detach().float())
        steps = set()
        for mv, vv, p in zip(self._views(self.m), self._views(self.v), params, strict=True):
            st = self.opt.state.get(p, {})
            if "exp_avg" in st:
                mv.copy_(st["exp_avg"])
                vv.copy_(st["exp_avg_sq"])
                steps.add(int(st["step"]))
        if len(steps) > 1:
            raise ValueError(f"optimizer state has parameters at different steps: {sorted(steps)}")
        self.step_count = steps.pop() if steps else 0
        self.opt.state.clear()  # held here until to_model(); two copies of a large student's moments cost GBs

    @torch.no_grad()
    def to_model(self, moments: bool = True) -> None:
        """Write the weights into the module and (with `moments`) the Adam state into the optimizer."""
        self.sync()
        params = list(self.model.parameters())
        for p, view, mv, vv in zip(params, self._views(self.params), self._views(self.m),
                                   self._views(self.v), strict=True):
            p.copy_(view)
            if moments and self.step_count:
                # views of the step's own moments, not copies (1.4 GB at the paper's size): the caller
                # saves them in the checkpoint and clears the optimizer's state right after
                self.opt.state[p] = {"step": torch.tensor(float(self.step_count)),
                                     "exp_avg": mv, "exp_avg_sq": vv}

    # A step starts when every thread has reached the barrier: the caller with a new job, the others
    # done with the last one; so a step's end needs no barrier of its own, only `sync()` before
    # anyone reads the weights. The caller can post the next job only after the threads have read
    # the last one: a step's threads meet again inside it, a sync's meet twice.
    # The caller's meetings are only in order while every step() and sync() it began has returned:
    # one left by an exception (Ctrl-C lands anywhere) may have released the threads into a job the
    # caller never finished, so `_settled` is false from a call's start until its normal return.

    def _serve(self, j: int) -> None:
        torch.set_num_threads(1)
        while True:
            try:
                self._barrier.wait()  # close() aborts it: BrokenBarrierError
                if self._job is _SYNC:  # a second meeting, so that no one posts a job before all read it
                    self._barrier.wait()
                    continue
            except threading.BrokenBarrierError:
                return
            self._run(j)

    def _run(self, j: int) -> None:
        try:
            self._work(j, *self._job)  # type: ignore[misc]
        except threading.BrokenBarrierError:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller of step()
            self._error = self._error or e
            self._barrier.abort()

    def _start(self, job: tuple[Any, ...] | None) -> None:
        self._job = job
        self._meet()

    def _raise(self) -> None:
        if self._error is not None:  # the threads have left: this step object is spent
            raise self._error

    def step(self, x: torch.Tensor, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One optimizer step on rows `idx` of (x, z); returns the batch loss (a 0-dim tensor).
        The other threads may still be finishing their share when it returns: `sync()` waits."""
        group = self.opt.param_groups[0]
        self.step_count += 1
        self._settled = False
        self._start((x, z, idx, self.step_count, float(group["lr"]), group["betas"], float(group["eps"]),
                     float(group["weight_decay"])))
        self._run(0)
        self._raise()
        self._settled = True
        return self.loss.clone()

    def sync(self) -> None:
        """Wait until every thread has finished the last step."""
        self._settled = False
        self._start(_SYNC)
        self._meet()
        self._settled = True

    def _meet(self) -> None:
        """Every thread at the barrier; a failed thread's error is raised here."""
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            self._raise()
            raise

    def close(self) -> None:
        """Stop the threads: after the last step's work when the calls so far returned normally; at
        their next barrier (within one matmul) when one was interrupted."""
        if self._settled:
            with contextlib.suppress(BaseException):
                self.sync()  # let a finished step's threads finish their share of its update
        self._barrier.abort()  # wherever a thread waits, it leaves
        for w in self._workers:
            w.join(timeout=10)
        torch.set_num_threads(self._saved_threads)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """All cores back to ordinary torch ops (evaluation between epochs)."""
        self.sync()
        torch.set_num_threads(self._saved_threads)
        try:
            yield
        finally:
            torch.set_num_threads(1)

    def __enter__(self) -> ThreadedStep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SplitStep(ThreadedStep):
    """Forward, backward and AdamW for one batch of the student, on `threads` CPU threads.

    `model` is the (class-padded) student on the CPU in float32, `opt` a `torch.optim.AdamW` over
    its parameters, `loss_fn(s, z)` the fit loss over the first `num_classes` logits (a mean over rows);
    `l2=True` uses its closed-form gradient. Use as a context manager, or call `close()`."""

    def __init__(self, model: nn.Sequential, opt: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_classes: int,
                 batch_size: int, threads: int, l2: bool = False, block: int | None = None) -> None:
        self.model, self.opt, self.loss_fn, self.l2 = model, opt, loss_fn, l2
        self.threads, self.c = max(1, threads), num_classes
        self.bottleneck = hasattr(model, "bottleneck")
        hidden, out = model.hidden, model.out
        self.h, self.cp = hidden.out_features, out.out_features
        self.d = model.bottleneck.in_features if self.bottleneck else hidden.in_features
        self.k = hidden.in_features if self.bottleneck else 0
        b, cp, h = batch_size, self.cp, self.h
        # hidden units a thread works through at a time: a block's activations, weights and gradients
        # (4 floats a unit per batch row, input and class) fill BLOCK_BYTES. At the paper's size, against
        # the step without blocks: 224-unit blocks (1 MB) took 1.10x its time, 2,048 and 8,192 units 0.98x
        # and 0.96x (one process, alternating steps)
        width_in = -(-(self.k + 1) // PAD) * PAD if self.bottleneck else self.d
        per_unit = 4 * (2 * b + 2 * (width_in + cp))
        self.block = block or max(16, BLOCK_BYTES // per_unit // 16 * 16)
        f32 = dict(dtype=torch.float32)
        if self.bottleneck:  # w1 (kp, D): rows k.. zero; w2 (H, kp): column k is the bias, k+1.. zero
            self.kp = -(-(self.k + 1) // PAD) * PAD
            shapes = [(self.d, self.kp), (h, self.kp), (h, cp), (cp,)]
        else:  # w2 (H, D) and b2 (H,)
            self.kp = 0
            shapes = [(h, self.d), (h,), (h, cp), (cp,)]
        self.params = [torch.zeros(s, **f32) for s in shapes]
        # Gradients held whole only for what is updated after the blocks (the bottleneck, the output
        # bias); the hidden layer's live one block at a time in each thread's scratch.
        self.grads = [torch.zeros(s, **f32) if i == 3 or (i == 0 and self.bottleneck) else torch.empty(0)
                      for i, s in enumerate(shapes)]
        self.m = [torch.zeros(s, **f32) for s in shapes]
        self.v = [torch.zeros(s, **f32) for s in shapes]
        self.step_count = 0
        self._from_model()

        nt = self.threads
        self.xb, self.tb = torch.empty(b, self.d, **f32), torch.empty(b, num_classes, **f32)
        self.z1 = torch.zeros(b, self.kp, **f32)
        self.dy = torch.zeros(b, cp, **f32)  # padded classes keep a zero gradient
        self.y = [torch.empty(b, cp, **f32) for _ in range(nt)]
        self.dz = [torch.empty(b, self.kp, **f32) for _ in range(nt)]
        self.loss = torch.zeros((), **f32)
        self._plans = [self._plan(j) for j in range(nt)]
        self._start_threads()

    # ---- layout: the module's parameters <-> this step's tensors -------------------------------------

    def _views(self, ts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of `ts` (in this step's layout) that line up with model.parameters()."""
        if self.bottleneck:
            w1, w2, w3, b3 = ts
            return [w1[:, : self.k].t(), w2[:, : self.k], w2[:, self.k], w3.t(), b3]
        w2, b2, w3, b3 = ts
        return [w2, b2, w3.t(), b3]

    # ---- the threads ---------------------------------------------------------------------------------

    def _plan(self, j: int) -> dict[str, Any]:
        """Thread j's hidden units in blocks (each with its activations and views of its weights and
        Adam moments), its slice of the bottleneck rows, and the scratch one block's gradients use."""
        nt, b, kp, cp = self.threads, self.xb.shape[0], self.kp, self.cp
        hs = _split(self.h, j, nt)
        width_in = kp if self.bottleneck else self.d  # what a hidden unit reads: z1, or x itself
        plan: dict[str, Any] = {"step": torch.zeros(()), "blocks": [],
                                "da": torch.empty(b * self.block),
                                "g_hid": torch.empty(self.block, width_in),
                                "g_out": torch.empty(self.block, cp)}
        hid = 1 if self.bottleneck else 0
        for start in range(hs.start, hs.stop, self.block):
            s = slice(start, min(start + self.block, hs.stop))
            rows = s.stop - s.start
            g_hid, g_out = plan["g_hid"][:rows], plan["g_out"][:rows]
            block = {"a": torch.empty(b, rows), "da": plan["da"][: b * rows].view(b, rows),
                     "w_hid": self.params[hid][s], "w_out": self.params[2][s],
                     "g_hid": g_hid, "g_out": g_out}
            owned = [(hid, g_hid), (2, g_out)]
            if not self.bottleneck:
                block["b_hid"], block["g_b"] = self.params[1][s], torch.empty(rows)
                owned.append((1, block["g_b"]))
            ps, ms, vs = ([t[i][s] for i, _ in owned] for t in (self.params, self.m, self.v))
            block["adam"] = (ps, [g for _, g in owned], ms, vs)
            plan["blocks"].append(block)
        late = []  # updated after the blocks: the bottleneck's input rows, whose gradient needs every
        if self.bottleneck:  # thread's blocks, and the output bias (thread 0)
            ds = _split(self.d, j, nt)
            plan["ds"], plan["dz"] = ds, torch.empty(b, kp)
            late.append((0, ds))
        if j == 0:
            late.append((3, slice(None)))
        plan["adam_late"] = tuple([t[i][s] for i, s in late]
                                  for t in (self.params, self.grads, self.m, self.v))
        return plan

    # ---- one thread's share of a step ----------------------------------------------------------------

    @torch.no_grad()
    def _work(self, j: int, x: torch.Tensor, z: torch.Tensor, idx: torch.Tensor, step: int, lr: float,
              betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        nt, plan, n = self.threads, self._plans[j], idx.shape[0]
        bs = _split(n, j, nt)
        mm, wait = torch.mm, self._barrier.wait
        xb, dy, y = self.xb[:n], self.dy[:n], self.y[j][:n]

        torch.index_select(x, 0, idx[bs], out=self.xb[bs])
        torch.index_select(z, 0, idx[bs], out=self.tb[bs])
        if self.bottleneck:
            mm(self.xb[bs], self.params[0], out=self.z1[bs])
            self.z1[bs, self.k] = 1.0
        wait()
        inp = self.z1[:n] if self.bottleneck else xb
        if not plan["blocks"]:  # fewer hidden units than threads
            y.zero_()
        for i, block in enumerate(plan["blocks"]):
            a = block["a"][:n]
            if self.bottleneck:
                mm(inp, block["w_hid"].t(), out=a)  # the bias is z1's column of ones
            else:
                torch.addmm(block["b_hid"], inp, block["w_hid"].t(), out=a)
            a.relu_()
            if i == 0:
                mm(a, block["w_out"], out=y)
            else:
                y.addmm_(a, block["w_out"])
        wait()

        if j == 0:  # the loss: a few small ops, cheaper on one thread than fought over for the GIL
            y = torch.add(self.y[0][:n, : self.c], self.params[3][: self.c])
            for other in self.y[1:]:
                y += other[:n, : self.c]
            t = self.tb[:n]
            if self.l2:
                diff = y.sub_(t)
                torch.mul(diff.pow(2).sum(), 0.5 / n, out=self.loss)
                torch.mul(diff, 1.0 / n, out=dy[:, : self.c])
            else:
                with torch.enable_grad():
                    y.requires_grad_(True)
                    loss = self.loss_fn(y, t)
                    loss.backward()
                self.loss.copy_(loss.detach())
                dy[:, : self.c] = y.grad
            torch.sum(dy, 0, out=self.grads[3])
        wait()

        plan["step"].fill_(step)  # this thread's copy: the caller may be posting the next step already

        def adam(lists: tuple[list[torch.Tensor], ...]) -> None:
            ps, gs, ms, vs = lists
            if ps:
                torch._fused_adamw_(ps, gs, ms, vs, [], [plan["step"]] * len(ps), amsgrad=False, lr=lr,
                                    beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps,
                                    maximize=False)

        # Block by block: its gradients and activations are still in cache when its AdamW runs.
        dz_j = self.dz[j][:n]
        for i, block in enumerate(plan["blocks"]):
            a, da = block["a"][:n], block["da"][:n]
            mm(a.t(), dy, out=block["g_out"])
            mm(dy, block["w_out"].t(), out=da)
            torch.ops.aten.threshold_backward.grad_input(da, a, 0, grad_input=da)
            mm(da.t(), inp, out=block["g_hid"])
            if self.bottleneck:  # with the weights before this step's update, which comes next
                if i == 0:
                    mm(da, block["w_hid"], out=dz_j)
                else:
                    dz_j.addmm_(da, block["w_hid"])
            else:
                torch.sum(da, 0, out=block["g_b"])
            adam(block["adam"])
        if self.bottleneck:
            if not plan["blocks"]:  # fewer hidden units than threads
                dz_j.zero_()
            wait()
            ds, dz = plan["ds"], plan["dz"][:n]
            dz.copy_(self.dz[0][:n])
            for other in self.dz[1:]:
                dz += other[:n]
            mm(xb[:, ds].t(), dz, out=self.grads[0][ds])
        adam(plan["adam_late"])
