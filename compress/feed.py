"""The training rows for the fit loop, one block at a time, the next one read while this one trains.

A training set that fits is one block, prepared once and kept (on the GPU when training there).
A larger one is read in blocks of rows in the order the loop asks for; a single background thread
reads and prepares block i+1 (slicing a memory map or shards, standardizing, converting to float32
tensors) while the loop trains on block i, so reading costs no training time unless it is slower
than training. For a GPU the prepared block lands in pinned (page-locked) host memory and is copied
on a stream of its own, which the training stream waits for only when it takes the block.
Two blocks are held while training (this one and the next, read ahead), three for a moment while
the one after that is being read.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Block = tuple["torch.Tensor", "torch.Tensor"]


class Feed:
    """Blocks of (inputs, targets) as tensors on `device`.

    `prep(x, z, a, b)` reads rows a:b of x and z (anything sliceable by rows) into float32 CPU tensors
    (standardized); `bounds` are the blocks' (a, b). One block: prepared here and reused every epoch."""

    def __init__(self, x: Any, z: Any, bounds: Sequence[tuple[int, int]],
                 prep: Callable[[Any, Any, int, int], Block], device: torch.device,
                 prefetch: bool = True) -> None:
        self.x, self.z, self.bounds, self.prep, self.device = x, z, list(bounds), prep, device
        self.prefetch = prefetch and len(self.bounds) > 1
        self.cuda = device.type == "cuda"
        self.resident = self._load(0, None) if len(self.bounds) == 1 else None

    def __len__(self) -> int:
        return len(self.bounds)

    def _load(self, k: int, stream: Any) -> tuple[Block, Any]:
        """Block k on the device, and (on a GPU) the event its copy records."""
        a, b = self.bounds[k]
        xt, zt = self.prep(self.x, self.z, a, b)
        if not self.cuda:
            return (xt, zt), None
        import torch

        if stream is None:  # the one resident block: copied once, no need to lock its pages
            return (xt.to(self.device), zt.to(self.device)), None
        xt, zt = xt.pin_memory(), zt.pin_memory()
        with torch.cuda.stream(stream):
            block = (xt.to(self.device, non_blocking=True), zt.to(self.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record()
        return block, done

    def _take(self, loaded: tuple[Block, Any]) -> Block:
        block, done = loaded
        if done is not None:
            import torch

            torch.cuda.current_stream(self.device).wait_event(done)
            for t in block:  # their memory is the training stream's from here on
                t.record_stream(torch.cuda.current_stream(self.device))
        return block

    def epoch(self, order: Sequence[int]) -> Iterator[Block]:
        """The blocks in `order`, each as (x, z) tensors."""
        if self.resident is not None:
            for _ in order:
                yield self._take(self.resident)
            return
        stream = None
        if self.cuda:
            import torch

            stream = torch.cuda.Stream(self.device)
        if not self.prefetch:
            for k in order:
                yield self._take(self._load(k, stream))
            return
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compress-feed") as pool:
            pending = pool.submit(self._load, order[0], stream) if order else None
            try:
                for i in range(len(order)):
                    loaded = pending.result()  # a failed read raises here, in the loop's thread
                    pending = pool.submit(self._load, order[i + 1], stream) if i + 1 < len(order) else None
                    block = self._take(loaded)
                    del loaded
                    yield block
                    del block  # the loop has let go of it too (it drops its names before asking again)
            finally:
                if pending is not None:  # the loop stopped early: let the read in flight finish
                    pending.cancel()
                    concurrent.futures.wait([pending])


GiB = 2**30
CUDA_RESERVE = 512 * 2**20  # the CUDA context, cuBLAS workspaces, the allocator's slack


class CudaPlan:
    """What fits on the GPU: the batch size, whether the training rows stay there whole, and how many
    rows an evaluation pass takes at once (no gradients: about a third of a training sample's memory)."""

    def __init__(self, batch: int, stream_rows: int | None, note: str | None) -> None:
        self.batch, self.stream_rows, self.note = batch, stream_rows, note
        self.eval_rows = min(8192, 3 * batch)


def plan_cuda(params: int, act_bytes: int, batch: int, rows: int, row_bytes: int, free_bytes: int,
              what: str = "the GPU", ddp: bool = False) -> CudaPlan:
    """Fit the student's training into `free_bytes` of GPU memory.

    `params` weights cost 22 bytes each (fp32 weights, gradients, both Adam moments and the best
    epoch's copy, and autocast's bf16 copy), 26 under DDP (its gradient buckets); `act_bytes` is one
    sample's activations and their gradients (see `activation_bytes`). The batch keeps at most half of
    what is left (halved until it fits, with a note saying so); the training rows stay on the GPU if
    they fit in the rest, else they are streamed in blocks of which three fit at once. Raises
    ConfigError when not even the weights and one sample fit."""
    from compress.errors import ConfigError

    state = (26 if ddp else 22) * params
    room = int(free_bytes * 0.9) - CUDA_RESERVE - state
    if room < 2 * act_bytes:
        raise ConfigError(f"--width: the student's weights and optimizer state need "
                          f"{state / GiB:.1f} GiB and {what} has {free_bytes / GiB:.1f} GiB free; "
                          "use a smaller --width or --rank, or train on the CPU (--device cpu)")
    fitted, note = batch, None
    while fitted > 1 and fitted * act_bytes > room // 2:
        fitted //= 2
    if fitted < batch:
        note = (f"--batch-size: {batch} samples of this student need {batch * act_bytes / GiB:.1f} GiB of "
                f"activations and {what} has room for {room / 2 / GiB:.1f}; training with {fitted}")
    data_room = room - fitted * act_bytes
    if rows * row_bytes <= data_room:
        return CudaPlan(fitted, None, note)
    return CudaPlan(fitted, max(fitted, data_room // (3 * row_bytes)), note)


def activation_bytes(d: int, k: int, h: int, c: int) -> int:
    """One sample's share of a training step's memory under bf16 autocast, with a quarter on top for
    the allocator: the input's bf16 copy, the bottleneck and hidden activations kept for backward,
    the hidden gradient twice (before and after the ReLU), and the logits in bf16 and fp32 with the
    loss's temporaries."""
    return (2 * d + 4 * k + 6 * h + 20 * c) * 5 // 4
