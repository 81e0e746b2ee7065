"""How a GPU trains the same student faster, without changing what is trained.

- The bottleneck's rank is padded to a multiple of RANK_ALIGN while training on CUDA; the padding
  units start at zero in and out, so their gradients stay zero and the real-rank student is sliced out
  exactly. Checkpoints keep the real rank (`with_rank`, `opt_with_rank`), so a run resumes on either
  kind of device from the same file.
- The hidden layer and its ReLU run as one cuBLASLt product with the bias and the ReLU in its epilogue
  (`fuse_hidden_relu`).

On an H100 the two took the paper-size student's bf16 step from 24.8 to 15.3 ms
(benchmarks/results/gpu_step_profile.md). compress.fit calls these; tests force them on the CPU.
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
