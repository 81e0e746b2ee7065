"""Channels-last teachers: (H, W, C) images as Keras and TensorFlow models converted to ONNX take them.
A conv student moves the channels first in its first layer (a Transpose in the ONNX graph), so its
convolutions run over the image and its standardization is per channel."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from compress.cli import cli
from compress.fit import FitConfig, fit
from compress.plan import student_config
from compress.student import build_student, channels_last
from tests.conftest import DigitsCNN, train_classifier
from tests.test_teacher_kinds import one_line_exit_2


def nhwc(x: np.ndarray) -> np.ndarray:
    """Digits (N, 64) as RGB-like (N, 8, 8, 3) images: the digit, half of it shifted by 40, and noise
    of another scale, so that every channel has its own mean and spread."""
    img = x.reshape(-1, 8, 8)
    noise = np.random.default_rng(1).normal(0, 5, img.shape)
    return np.stack([img, 0.5 * img + 40, noise], axis=-1).astype(np.float32)


class NHWCTeacher(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 8, 8, 3)
        return self.net(x[..., 0].flatten(1))


@pytest.fixture(scope="module")
def nhwc_files(tmp_path_factory, digits):
    folder = tmp_path_factory.mktemp("nhwc")
    net = train_classifier(DigitsCNN(), digits["x"], digits["y"], seed=0)
    path = folder / "nhwc.onnx"
    torch.onnx.export(NHWCTeacher(net).eval(), (torch.from_numpy(nhwc(digits["x"][:2])),), str(path),
                      dynamo=False, input_names=["input_1"], output_names=["dense"],
                      dynamic_axes={"input_1": {0: "N"}, "dense": {0: "N"}}, opset_version=17)
    files = {"teacher": path, "x": folder / "x.npy", "x_test": folder / "xt.npy", "y_test": folder / "yt.npy"}
    np.save(files["x"], nhwc(digits["x"]))
    np.save(files["x_test"], nhwc(digits["x_test"]))
    np.save(files["y_test"], digits["y_test"])
    return files


def test_the_rule():
    assert channels_last((8, 8, 3)) and channels_last((28, 28, 1)) and channels_last((224, 224, 4))
    assert not channels_last((3, 8, 8)) and not channels_last((1, 28, 28)) and not channels_last((4, 8, 4))
    assert not channels_last((20, 2)) and channels_last((20, 2), "last")
    assert not channels_last((8, 8, 3), "first") and channels_last((3, 8, 8), "last")


def test_a_channels_last_student_is_the_channels_first_one_on_moved_inputs():
    last = student_config((8, 8, 3), 10, 64, 16, "8c3-p-16L-64")
    first = student_config((3, 8, 8), 10, 64, 16, "8c3-p-16L-64")
    assert last.channels_last and not first.channels_last
    assert [ly.kind for ly in last.layers()][:2] == ["transpose", "norm"]
    assert last.layers()[1:] == first.layers() and last.spec == first.spec
    a, b = build_student(last), build_student(first)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 8, 8, 3)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x.permute(0, 3, 1, 2)))
        torch.testing.assert_close(a(x.flatten(1)), b(x.permute(0, 3, 1, 2)))  # flat rows, as fit feeds


def test_standardization_is_per_channel_of_the_last_axis(digits):
    x = nhwc(digits["x"][:400])
    z = np.random.default_rng(0).normal(size=(400, 10)).astype(np.float32)
    cfg = student_config((8, 8, 3), 10, 32, 8, "4c3-p-8L-32")
    res = fit(x[:300], z[:300], x[300:], z[300:], cfg, FitConfig(epochs=1))
    mean = res.model.norm.mean.numpy()  # (C, H, W): one value per channel, over all positions
    for c in range(3):
        assert np.allclose(mean[c], x[:300, :, :, c].mean(), atol=1e-3)
    assert abs(mean[1, 0, 0] - mean[0, 0, 0]) > 30  # the channels were not mixed up


def test_distill_a_channels_last_teacher(tmp_path, nhwc_files, digits):
    out = tmp_path / "out"
    args = ["distill", str(nhwc_files["teacher"]), "--data", str(nhwc_files["x"]), "--eval-data",
            str(nhwc_files["x_test"]), "--eval-labels", str(nhwc_files["y_test"]), "--out", str(out),
            "--student", "16c3-p-32L-512", "--epochs", "60", "--precision", "int8", "--quantize", "static",
            "--bench-seconds", "0.05", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["teacher"]["accuracy"] > 0.85
    assert report["student"]["accuracy"] >= report["teacher"]["accuracy"] - 0.05
    assert report["student"]["layers"][:3] == ["transpose", "norm", "16c3"]
    assert any("read channels last" in n and "--layout first" in n for n in report["train"]["notes"])
    assert report["export"]["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(out / "student.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.index("Transpose") < ops.index("Conv")
    sess = ort.InferenceSession(str(out / "student.onnx"))
    inp = sess.get_inputs()[0]
    assert (inp.name, inp.shape) == ("input_1", ["batch", 8, 8, 3])
    (logits,) = sess.run(None, {"input_1": nhwc(digits["x_test"])})
    accuracy = float((logits.argmax(1) == digits["y_test"]).mean())
    assert accuracy == pytest.approx(report["student"]["accuracy"])
    assert report["exports"][0]["agreement_with_fp32"] >= 0.97
    shown = CliRunner().invoke(cli, ["inspect", str(nhwc_files["teacher"])])
    assert "3 channel(s) of 8x8, channels last" in " ".join(shown.output.split())


def test_layout_first_reads_the_first_axis_as_channels(tmp_path, nhwc_files):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["distill", str(nhwc_files["teacher"]), "--data", str(nhwc_files["x"]),
                                      "--out", str(out), "--student", "4c3-p-8L-64", "--layout", "first",
                                      "--epochs", "2", "--bench-seconds", "0.05", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["student"]["layers"][0] == "norm"
    assert report["run"]["student"]["channels_last"] is False


def test_layout_last_needs_a_channel_axis(tmp_path, digits_files):
    line = one_line_exit_2(["distill", str(digits_files["teacher"]), "--data", str(digits_files["x"]),
                            "--out", str(tmp_path / "o"), "--student", "4c3-p-64", "--layout", "last"],
                           "--layout last", "(64,)")
    assert "channel" in line
