"""Training checkpoints: written atomically after every epoch, read back by `--resume`.

A checkpoint holds everything the loop needs to continue as if never stopped: model, optimizer and
schedule states, the shuffling generator's state, the best epoch so far and the history. It is read
with `weights_only=True` (tensors and plain containers only). Its `run` entry (student and fit
configuration, sample count, input statistics) must match the resuming run's, or it is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.atomic import atomic_path
from compress.errors import ConfigError


def save(path: str | Path, state: dict[str, Any]) -> None:
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: a full disk raises OSError
        torch.save(state, f)


def load(path: str | Path, run: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at `path` when there is one for this run; None when there is none."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}); "
                          "delete it to start afresh") from None
    saved = state.get("run", {})
    mismatched = sorted(k for k in run if k not in saved or not _same(saved[k], run[k]))
    if mismatched:
        raise ConfigError(f"--resume: {path} belongs to another run (differs in {', '.join(mismatched)}); "
                          "delete it, or resume with the same data and options")
    return state


def finished_epoch(path: str | Path, run: dict[str, Any]) -> int | None:
    """The last epoch saved in `path` when it is a checkpoint of this run; None otherwise. Memory-mapped:
    a large student's weights and moments are not read."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        saved = state["run"]
        if all(k in saved and _same(saved[k], run[k]) for k in run):
            return int(state["epoch"])
    except Exception:  # noqa: BLE001 - missing, unreadable or foreign: nothing to warn about
        pass
    return None


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return bool(torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                                   torch.as_tensor(b, dtype=torch.float64), rtol=1e-6, atol=1e-9))
    return bool(a == b)
