"""The built-in default: an MNIST-1D CNN teacher shipped with the package, and fresh transfer data.

MNIST-1D (Greydanus 2020) is regenerated offline by the `mnist1d` package: the standard split (4,000
train / 1,000 test, seed 42) and any number of fresh unlabeled samples from other seeds. The teacher
(`assets/mnist1d_cnn.onnx`) was trained by `benchmarks/train_mnist1d_teacher.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from compress.atomic import atomic_path, writing

TEACHER = "mnist1d_cnn.onnx"
TRANSFER_SEED = 1234  # any seed but 42 (the standard set's) gives fresh samples


def teacher_path() -> Path:
    return Path(str(resources.files("compress") / "assets" / TEACHER))


def mnist1d(num_samples: int = 5000, seed: int = 42, train_split: float = 0.8) -> dict[str, np.ndarray]:
    """MNIST-1D as `mnist1d.data.make_dataset` makes it (seed 42, 5,000 samples: the standard set)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    d = make_dataset(args)
    return {k: np.asarray(d[k], dtype=np.float32 if k.startswith("x") else np.int64)
            for k in ("x", "y", "x_test", "y_test")}


@dataclass(frozen=True)
class DemoFiles:
    teacher: Path
    transfer: Path
    test_x: Path
    test_y: Path


def prepare(out_dir: str | Path, transfer: int) -> DemoFiles:
    """Write fresh transfer inputs (labels dropped) and the standard test set into out_dir/data."""
    folder = Path(out_dir) / "data"
    with writing(folder):  # a file in the way, or a folder that cannot be made: one line
        folder.mkdir(parents=True, exist_ok=True)
    files = DemoFiles(teacher_path(), folder / f"transfer_{transfer}.npy", folder / "test_x.npy",
                      folder / "test_y.npy")
    if not files.transfer.exists():
        _save(files.transfer, mnist1d(transfer, TRANSFER_SEED, train_split=1.0)["x"])
    if not (files.test_x.exists() and files.test_y.exists()):
        std = mnist1d()
        _save(files.test_x, std["x_test"])
        _save(files.test_y, std["y_test"])
    return files


def _save(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
