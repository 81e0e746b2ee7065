"""Data parallel runs under torchrun: `torchrun --nproc-per-node N compress distill ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init()` joins the process group (NCCL when torch sees
GPUs, gloo on CPUs) and returns who this process is. Without torchrun it is a world of one and nothing
is initialized. Each rank labels a contiguous shard of the transfer data and the logits are gathered
to all ranks; training is DDP over equal random shards; only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun), before init()."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    """Whether this process is rank 0 (or not under torchrun), before init()."""
    return os.environ.get("RANK", "0") == "0"


def init() -> World:
    size = world_size()
    if size <= 1:
        return World()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return World(dist.get_rank(), dist.get_world_size(), local)


def shard(n: int, world: World) -> tuple[int, int]:
    """This rank's contiguous rows [start, stop) of n."""
    per = -(-n // world.size)
    return min(n, world.rank * per), min(n, (world.rank + 1) * per)


def gather_rows(part: np.ndarray, n: int, world: World) -> np.ndarray:
    """Every rank's `shard` rows, concatenated in rank order, on every rank."""
    import torch
    import torch.distributed as dist

    per = -(-n // world.size)
    buf = np.zeros((per, *part.shape[1:]), dtype=np.float32)
    buf[: len(part)] = part
    device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    mine = torch.from_numpy(buf).to(device)
    parts = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(parts, mine)
    return torch.cat(parts).cpu().numpy()[:n]


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def finish(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
