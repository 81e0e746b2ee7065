"""Train the built-in demo teacher: a small 1-D CNN on MNIST-1D, exported to ONNX.

The architecture follows Greydanus (2020)'s MNIST-1D CNN baseline (three strided 1-D convolutions and
a linear layer; published test accuracy 94%). Trained on the standard 4,000 training samples and
scored on the standard 1,000 test samples; writes compress/assets/mnist1d_cnn.onnx and
benchmarks/results/mnist1d_teacher.json.

    python benchmarks/train_mnist1d_teacher.py            # train, export, record
    python benchmarks/train_mnist1d_teacher.py --check    # score the committed ONNX file only
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.demo import mnist1d, teacher_path
from compress.evaluate import run_onnx

RESULT = Path(__file__).parent / "results" / "mnist1d_teacher.json"


class ConvNet(nn.Module):
    def __init__(self, channels: int = 32):
        super().__init__()
        c = channels
        self.conv = nn.Sequential(
            nn.Conv1d(1, c, 5, stride=2, padding=1), nn.ReLU(),  # (N, 1, 40) -> (N, c, 19)
            nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),  # -> (N, c, 10)
            nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),  # -> (N, c, 5)
        )
        self.head = nn.Linear(c * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 40)
        h = self.conv(x.unsqueeze(1))  # (N, c, 5)
        return self.head(h.flatten(1))  # (N, 10) logits


def train(seed: int, steps: int = 8000, batch: int = 100) -> ConvNet:
    d = mnist1d()
    torch.manual_seed(seed)
    model = ConvNet()
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def export(model: nn.Module, path: Path) -> None:
    x = torch.zeros(2, 40)
    prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], output_names=["logits"],
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert prog is not None
    prog.save(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only score the committed ONNX teacher")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    d = mnist1d()
    path = teacher_path()
    t0 = time.perf_counter()
    if not args.check:
        model = train(args.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        export(model, path)
    seconds = time.perf_counter() - t0
    logits = run_onnx(path, d["x_test"])
    acc = float((logits.argmax(1) == d["y_test"]).mean())
    train_acc = float((run_onnx(path, d["x"]).argmax(1) == d["y"]).mean())
    params = sum(int(np.prod(p.shape)) for p in ConvNet().parameters())
    result = {"teacher": str(path.name), "test_accuracy": acc, "train_accuracy": train_acc,
              "test_samples": int(d["y_test"].size), "params": params,
              "train_seconds": None if args.check else seconds, "seed": args.seed,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    if not args.check:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
