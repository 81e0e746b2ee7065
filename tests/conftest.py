"""Fixtures made by code: scikit-learn's digits (shipped with it, offline) and tiny teachers trained
and exported to ONNX inside the test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A 64-feature CNN: the flat 8x8 digit is reshaped to an image inside the model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())  # (N, 32, 4, 4)
        self.head = nn.Linear(32 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 64)
        return self.head(self.conv(x.view(-1, 1, 8, 8)).flatten(1))  # (N, 10)


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 600,
                     seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def export_teacher(model: nn.Module, sample: np.ndarray, path: Path, input_name: str = "x",
                   output_name: str = "logits") -> Path:
    """Export with the legacy TorchScript exporter: quick, and what many users' files come from."""
    torch.onnx.export(model, (torch.from_numpy(sample[:2]),), str(path), dynamo=False,
                      input_names=[input_name], output_names=[output_name],
                      dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                      opset_version=17)
    return path


@pytest.fixture(scope="session")
def digits() -> dict[str, np.ndarray]:
    """Digits scaled to [0, 1]: 1,200 transfer/training samples and 597 held-out ones."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    return {"x": x[:1200], "y": y[:1200], "x_test": x[1200:], "y_test": y[1200:]}


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory: pytest.TempPathFactory, digits: dict[str, np.ndarray]
                 ) -> dict[str, Path]:
    """The digits CNN teacher as ONNX, and the data as .npy files."""
    folder = tmp_path_factory.mktemp("digits")
    model = train_classifier(DigitsCNN(), digits["x"], digits["y"])
    files = {"teacher": export_teacher(model, digits["x"], folder / "teacher.onnx")}
    for k in ("x", "y", "x_test", "y_test"):
        files[k] = folder / f"{k}.npy"
        np.save(files[k], digits[k])
    return files
