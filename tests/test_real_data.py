"""Issue 15: what real data does that random arrays do not. Image sets with a blank border have input
features that are constant, or nearly so, over the transfer set; held-out images may differ there."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner
from torch import nn

from compress.cli import cli
from tests.conftest import DigitsCNN, export_teacher, train_classifier
from tests.hooks import HANG_S, sigint_default

MEAN, STD = 0.1307, 0.3081  # normalized the usual MNIST way: the blank border is -0.4242


class Bordered(nn.Module):
    """A 10x10 image: a one-pixel border around the 8x8 digit; the CNN looks at the digit only."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 100) -> (N, 10)
        return self.inner(x.view(-1, 10, 10)[:, 1:9, 1:9].reshape(-1, 64))


def bordered(digits: np.ndarray, border: np.ndarray) -> np.ndarray:
    img = np.broadcast_to(border.reshape(-1, 10, 10), (len(digits), 10, 10)).copy()
    img[:, 1:9, 1:9] = ((digits - MEAN) / STD).reshape(-1, 8, 8)
    return img.reshape(-1, 100).astype(np.float32)


def test_constant_and_near_constant_features(tmp_path, digits):
    blank = np.full(100, -MEAN / STD, np.float32)
    rng = np.random.default_rng(0)
    x = bordered(digits["x"], blank)
    x[:, 0] += rng.standard_normal(len(x)).astype(np.float32) * 1e-5  # near-constant, sd ~1e-5
    x[:3, 9] += 0.3  # ink in a border pixel of 3 images out of 1,200
    # held out: other values on the border (the teacher does not look there)
    x_test = bordered(digits["x_test"], blank)
    border = np.ones((10, 10), bool)
    border[1:9, 1:9] = False
    x_test[:, border.ravel()] = rng.uniform(-0.42, 2.8, (len(x_test), int(border.sum())))
    teacher = Bordered(train_classifier(DigitsCNN(), (digits["x"] - MEAN) / STD, digits["y"]))
    export_teacher(teacher.eval(), x, tmp_path / "t.onnx")
    for name, arr in (("x", x), ("x_test", x_test), ("y_test", digits["y_test"])):
        np.save(tmp_path / f"{name}.npy", arr)
    r = CliRunner().invoke(cli, [
        "distill", str(tmp_path / "t.onnx"), "--data", str(tmp_path / "x.npy"), "--eval-data",
        str(tmp_path / "x_test.npy"), "--eval-labels", str(tmp_path / "y_test.npy"), "--width", "1k",
        "--rank", "32", "--epochs", "40", "--bench-seconds", "0.01", "--out", str(tmp_path / "run"),
        "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["export"]["max_abs_diff"] <= 1e-4
    residuals = [h["val_residual"] for h in report["train"]["history"]]
    assert max(residuals) < 1e3 and residuals[-1] < 0.2, residuals
    assert report["teacher"]["accuracy"] > 0.9
    assert report["student"]["accuracy"] >= report["teacher"]["accuracy"] - 0.05, report["student"]
    assert any("constant over the transfer data" in n for n in report["train"]["notes"])


def test_progress_lines_reach_a_log_during_the_run(tmp_path, digits_files):
    """`compress distill ... 2> log`: plain progress lines are in the log while the run goes on. The
    run is held after its second epoch's checkpoint (tests/hooks.py: the first epoch's line is out by
    then) and the log read there."""
    import signal
    import subprocess
    import sys

    from tests.test_distill import wait_for

    f, ready, log = digits_files, tmp_path / "ready", tmp_path / "log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.hooks", "compress.checkpoint:save", "2",
                                 str(ready), "--", "distill", str(f["teacher"]), "--data", str(f["x"]),
                                 "--width", "64", "--epochs", "5", "--out", str(tmp_path / "run")],
                                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=sigint_default)
        try:
            wait_for(ready, proc)
            lines = log.read_text().splitlines()
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=HANG_S)
    assert "teacher: 1,200/1,200 rows" in lines, lines
    epoch = [line for line in lines if line.startswith("fit: epoch 1/5,") and "residual" in line]
    assert epoch and "samples/s" in epoch[0], lines
    assert not any("\x1b[" in line for line in lines)  # no terminal control codes in a log
