"""A teacher for tests that must stop a labelling run at a known point, without racing a clock.

`--arch tests.gated_teacher:make` builds a fixed linear classifier over 64 features. With
GATE_AFTER_ROWS=N in the environment, the call that brings it to N rows (one-row probes not
counted) takes longer than the cache's commit interval (so the chunk it ends is committed: sleep
never returns early), and any call after that blocks until the process is killed. Under torchrun,
GATE_RANK=R gates rank R alone.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from compress.targets import COMMIT_SECONDS


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 64) -> (N, 10)
        gate = int(os.environ.get("GATE_AFTER_ROWS", "0"))
        if os.environ.get("GATE_RANK", os.environ.get("RANK")) != os.environ.get("RANK"):
            gate = 0  # torchrun: only the rank named by GATE_RANK stops
        if x.shape[0] == 1:  # a probe for the class count (their number varies by command)
            return self.linear(x)
        if gate and self.seen >= gate:
            while True:  # the test kills the process here
                time.sleep(1)
        self.seen += x.shape[0]
        if gate and self.seen >= gate:  # the call that reaches the gate outlasts the commit interval
            time.sleep(2 * COMMIT_SECONDS)
        return self.linear(x)


def make() -> nn.Module:
    torch.manual_seed(0)
    return Gated()
