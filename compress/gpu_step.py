"""How a GPU trains the same student faster, without changing what is trained.

- The bottleneck's rank is padded to a multiple of RANK_ALIGN while training on CUDA; the padding
  units start at zero in and out, so their gradients stay zero and the real-rank student is sliced out
  exactly. Checkpoints keep the real rank (`with_rank`, `opt_with_rank`), so a run resumes on either
  kind of device from the same file.
- The hidden layer and its ReLU run as one cuBLASLt product with the bias and the ReLU in its epilogue
  (`fuse_hidden_relu`).

- A small student's whole step (forward, backward, AdamW) is captured once as a CUDA graph and
  replayed (`GraphStep`): its step is bound by launching kernels from Python, not by the GPU.

On an H100 the first two took the paper-size student's bf16 step from 24.8 to 15.3 ms
(benchmarks/results/gpu_step_profile.md); the graph ran small students' steps 7.6-19x faster
(benchmarks/results/gpu_small_step.md). compress.fit calls these; tests force the first two on the CPU.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

# On a GPU the bottleneck's rank is padded to a multiple of this while training: with k=250 the three
# products of the hidden layer have a dimension of 500 bytes, which cuBLAS serves with Ampere-era
# kernels aligned to 2 elements; on an H100 they took 11.5 of a 25 ms step of the paper-size student
# (benchmarks/results/gpu_step_profile.md). The padding units start at zero and stay zero (their
# gradients are zero), so the trained student is exactly the real-rank one; it is sliced out at the end.
RANK_ALIGN = 8


def padded_rank(rank: int, device: torch.device) -> int:
    """The rank the student trains with on `device` (see RANK_ALIGN); the CPU split step pads its own."""
    return -(-rank // RANK_ALIGN) * RANK_ALIGN if device.type == "cuda" else rank


def fuse_relu_on(device: torch.device) -> bool:
    """Whether the hidden layer trains as one product with its bias and ReLU (see `fuse_hidden_relu`)."""
    import torch

    return device.type == "cuda" and hasattr(torch, "_addmm_activation")


def fuse_hidden_relu(model: nn.Sequential) -> None:
    """The training model's hidden layer and ReLU as one cuBLASLt product with the bias and the ReLU in
    its epilogue, and a backward pass that masks the gradient with the saved output: one pass over the
    batch x H activations fewer each step (on an H100, the paper-size student's bf16 step 17.4 -> 15.3
    ms at batch 4096; benchmarks/results/gpu_step_profile.md). Same parameters, same function."""
    from torch import nn

    hidden = model.hidden
    hidden.forward = lambda x: _linear_relu().apply(x, hidden.weight, hidden.bias)
    model.relu = nn.Identity()


@functools.cache
def _linear_relu() -> type:
    import torch

    class LinearReLU(torch.autograd.Function):
        @staticmethod
        @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.bfloat16)
        def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            h = torch._addmm_activation(b, x, w.t(), use_gelu=False)
            ctx.save_for_backward(x, w, h)
            return h

        @staticmethod
        @torch.amp.custom_bwd(device_type="cuda")
        def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            x, w, h = ctx.saved_tensors
            g = torch.ops.aten.threshold_backward(g, h, 0)
            dx = g @ w if ctx.needs_input_grad[0] else None
            return dx, g.t() @ x, g.sum(0)

    return LinearReLU


# The tensors whose shape follows the rank, and the axis that does: checkpoints keep the real rank, so
# that a run resumes on another device (padded or not) from the same file.
RANK_AXES = {"bottleneck.weight": 0, "embed.weight": 1, "embed.ngram": 1, "hidden.weight": 1}


def with_rank(tensors: dict[str, Any], rank: int) -> dict[str, Any]:
    """`tensors` (a state dict) with the rank axes cut or zero-padded to `rank`; others as they are."""
    import torch

    if rank == 0:  # no bottleneck: nothing follows the rank (hidden.weight's axis 1 is the input)
        return tensors
    out = dict(tensors)
    for name, axis in RANK_AXES.items():
        t = out.get(name)
        if t is None or t.shape[axis] == rank:
            continue
        if t.shape[axis] > rank:
            out[name] = t.narrow(axis, 0, rank).clone()
        else:
            shape = list(t.shape)
            shape[axis] = rank - t.shape[axis]
            out[name] = torch.cat([t, t.new_zeros(shape)], dim=axis)
    return out


def opt_with_rank(state: dict[str, Any], names: list[str], rank: int) -> dict[str, Any]:
    """An optimizer state dict with each parameter's moments resized like `with_rank` (`names`: the
    parameters' names in the optimizer's order)."""
    import torch

    def resize(name: str, v: Any) -> Any:  # the moments have the parameter's shape; "step" does not
        if isinstance(v, torch.Tensor) and name in RANK_AXES and v.dim() == 2:
            return with_rank({name: v}, rank)[name]
        return v

    per = {i: {k: resize(names[i], v) for k, v in st.items()} for i, st in state["state"].items()}
    return {**state, "state": per}


def portable(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict as a run on any device loads it: GraphStep's learning-rate tensor
    (on its GPU) as a number, and not `capturable` (GraphStep sets both again when it resumes)."""
    groups = [{**g, "lr": float(g["lr"]), "capturable": False} for g in state["param_groups"]]
    return {**state, "param_groups": groups}


# A step of a small student on a GPU is bound by launching its kernels from Python (38-88 kernels,
# 2.4-5.3 ms a step on an H100 whatever the batch up to 2,048), not by the GPU; replayed as one CUDA
# graph the same step took 0.14-0.54 ms, 7.6-19x faster with identical losses, up to 2.8 GFLOP a step
# (benchmarks/results/gpu_small_step.md; in the fit loop on an H200, the MNIST-1D conv students
# 11.4-12.3x over two runs, benchmarks/results/train_throughput_cuda.md; the 8k-wide MLP student at
# batch 256, 6 GFLOP a step, 7.5x). A step the GPU itself takes long enough over gains nothing: the
# paper-size student at batch 128 (133 GFLOP a step) trained 0.85x as fast with the graph as without
# (same run, twice), so larger steps run eagerly. Between 6 and 133 GFLOP: unmeasured.
GRAPH_MAX_FLOP_PER_STEP = 10e9


class GraphStep:
    """The whole training step (gradients zeroed, forward in bf16 autocast, loss, backward, the fused
    AdamW update) captured once as a CUDA graph and replayed for every full batch; the batch's rows
    are gathered into fixed input buffers first. A shorter batch (an epoch's or a block's last) runs
    the same step eagerly. The optimizer must be AdamW(fused=True); the learning rate becomes a tensor
    the scheduler fills in place (`capturable`), and gradients are zeroed, never set to None, so that
    the graph's addresses stay valid. Same arithmetic as the eager step (the losses match exactly)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Any, real: slice, batch: int,
                 autocast: Any) -> None:
        import torch

        self.model, self.opt, self.loss_fn, self.real, self.batch = model, opt, loss_fn, real, batch
        self.autocast = autocast
        device = next(model.parameters()).device
        for group in opt.param_groups:  # also after a checkpoint from another device was loaded
            group["capturable"] = True
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None  # why the capture failed, if it did: every step then runs eagerly
        self.x = self.z = self.loss = None
        self.grads: list[int] = []

    def _body(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            loss = self.loss_fn(self.model(x)[:, self.real].float(), z)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def _eager(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=False)  # in place: the graph holds these gradients' addresses
        loss = self._body(x, z)
        if self.grads and self.grads != [p.grad.data_ptr() for p in self.model.parameters()]:
            raise RuntimeError("GraphStep: an eager step replaced a gradient tensor the graph uses")
        return loss

    def _capture(self, xt: torch.Tensor, zt: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        import torch

        self.x = xt.new_empty((self.batch, *xt.shape[1:]))
        self.z = zt.new_empty((self.batch, *zt.shape[1:]))
        torch.index_select(xt, 0, idx, out=self.x)
        torch.index_select(zt, 0, idx, out=self.z)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # this batch's real step, eagerly: it makes gradients and state
            for p in self.model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            loss = self._eager(self.x, self.z)
        torch.cuda.current_stream().wait_stream(side)
        self.grads = [p.grad.data_ptr() for p in self.model.parameters()]
        graph = torch.cuda.CUDAGraph()
        try:  # thread_local: the feed's thread may copy the next block to the GPU meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # recorded, not run
                for p in self.model.parameters():
                    p.grad.zero_()
                self.loss = self._body(self.x, self.z)
        except RuntimeError as e:  # an op that cannot be captured: the run goes on eagerly
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return loss
        self.graph = graph
        return loss

    def step(self, xt: torch.Tensor, zt: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One optimizer step on rows `idx` of xt, zt (on the GPU); returns the loss (a GPU scalar)."""
        import torch

        if idx.shape[0] != self.batch or self.failed:
            return self._eager(xt[idx], zt[idx])
        if self.graph is None:
            return self._capture(xt, zt, idx)
        torch.index_select(xt, 0, idx, out=self.x)
        torch.index_select(zt, 0, idx, out=self.z)
        self.graph.replay()
        return self.loss
