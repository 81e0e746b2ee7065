"""Which training step runs a fit (`--engine`), and building the CPU one.

- `split` (compress.split_step, compress.conv_step): single-process CPU training, on the cores split by
  hidden units (MLP students) or by batch rows (conv students), without autograd;
- `graph` (compress.gpu_step.GraphStep): one GPU, the whole step replayed as one CUDA graph;
- `autograd`: torch's own, everywhere (and the only one under torchrun);
- `auto`: split on a CPU and graph on a GPU where they pay (the thresholds below), else autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from compress import gpu_step
from compress.errors import ConfigError
from compress.student import StudentConfig, flops_per_sample

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress.fit import FitConfig


# The split CPU step costs its threads about 1 ms a step to meet; from about 100 MFLOP a step it is
# faster than autograd (2-core CPU, fit loop: 60k vs 58k samples/s at 154 MFLOP, 48k vs 37k at 519,
# 3.6k vs 2.8k at 25 GFLOP), and below it slower (100k vs 280k samples/s for a 32-wide student).
SPLIT_MIN_FLOP_PER_STEP = 100e6
SPLIT_NEEDS_THE_CPU = "--engine split: only for single-process CPU training (--device cpu)"
GRAPH_NEEDS_A_GPU = "--engine graph: only for training on one GPU (--device cuda, one process)"


def use_split(fit_cfg: FitConfig, device: torch.device, ranks: int, cfg: StudentConfig,
              batch_size: int) -> bool:
    """The split CPU step (compress.split_step) for single-process CPU runs where it pays."""
    import torch

    if fit_cfg.engine == "split" and cfg.vocab:
        raise ConfigError("--engine split: only for students of float inputs; use autograd")
    if fit_cfg.engine in ("autograd", "graph") or device.type != "cpu" or ranks > 1 or cfg.vocab:
        if fit_cfg.engine == "split":
            raise ConfigError(SPLIT_NEEDS_THE_CPU)
        return False
    if fit_cfg.engine == "split":
        return True
    step_flop = 3 * flops_per_sample(cfg) * batch_size  # forward + backward: 6 x weights a sample
    # torch._fused_adamw_ is the kernel behind AdamW(fused=True); should a torch drop it, autograd runs
    return step_flop >= SPLIT_MIN_FLOP_PER_STEP and hasattr(torch, "_fused_adamw_")


def use_graph(fit_cfg: FitConfig, device: torch.device, ranks: int, cfg: StudentConfig,
              batch_size: int) -> bool:
    """One CUDA graph of the whole step (compress.gpu_step.GraphStep) on a single GPU, for a step small
    enough that launching its kernels from Python is what takes the time."""
    if fit_cfg.engine == "graph" and (device.type != "cuda" or ranks > 1):
        raise ConfigError(GRAPH_NEEDS_A_GPU)
    if fit_cfg.engine == "graph":
        return True
    if fit_cfg.engine != "auto" or device.type != "cuda" or ranks > 1 or cfg.vocab:
        return False  # token students: their bag's backward is unmeasured under a graph
    return 3 * flops_per_sample(cfg) * batch_size <= gpu_step.GRAPH_MAX_FLOP_PER_STEP


def split_step(model: nn.Sequential, opt: torch.optim.Optimizer,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cfg: StudentConfig,
               batch_size: int, l2: bool) -> Any:
    """The split CPU step for `model`, on torch's threads: a conv student's batch is split across the
    cores (compress.conv_step), an MLP's hidden layer (compress.split_step)."""
    import torch

    from compress.conv_step import ConvStep
    from compress.split_step import SplitStep

    return (ConvStep if cfg.front else SplitStep)(model, opt, loss_fn, cfg.num_classes, batch_size,
                                                  torch.get_num_threads(), l2=l2)
