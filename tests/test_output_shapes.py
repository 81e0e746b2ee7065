"""Teachers whose scores come with axes of size 1 around them: (N, C, 1, 1) from a classifier that ends in
a 1x1 convolution (SqueezeNet and other ONNX model-zoo nets), or (N, 1, C). They are distilled on the
(N, C) scores, and the student's ONNX file gives the teacher's own output shape."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compress.cli import cli
from compress.teachers import scores
from tests.test_teacher_kinds import one_line_exit_2


def shaped_teacher(path, w, shape):
    """x (N, 64) @ w (64, 10), reshaped to (N, *shape)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["flat"]),
             helper.make_node("Reshape", ["flat", "shape"], ["scores"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", *shape])],
                              [numpy_helper.from_array(w, "w"),
                               numpy_helper.from_array(np.array([-1, *shape], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def weights(digits):
    """A linear classifier of the digits, fitted by least squares on one-hot targets."""
    x, y = digits["x"], digits["y"]
    w, *_ = np.linalg.lstsq(x, np.eye(10)[y] * 10.0, rcond=None)
    return w.astype(np.float32)


def test_scores():
    y = np.zeros((4, 10, 1, 1), np.float32)
    assert scores(y, 4).shape == (4, 10) and scores(y.reshape(4, 1, 10), 4).shape == (4, 10)
    assert scores(np.zeros((4, 10)), 4).shape == (4, 10)
    assert scores(np.zeros((4, 10, 2)), 4) is None and scores(np.zeros((3, 10)), 4) is None


@pytest.mark.parametrize("shape", [(10, 1, 1), (1, 10)])
def test_student_gives_the_teachers_shape(tmp_path, digits, digits_files, weights, shape):
    teacher = shaped_teacher(tmp_path / "t.onnx", weights, shape)
    out = tmp_path / "out"
    f = digits_files
    args = ["distill", str(teacher), "--data", str(f["x"]), "--eval-data", str(f["x_test"]), "--eval-labels",
            str(f["y_test"]), "--out", str(out), "--width", "512", "--rank", "32", "--precision", "fp16,int8",
            "--quantize", "static", "--bench-seconds", "0.05", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["teacher"]["accuracy"] > 0.85
    assert report["student"]["accuracy"] >= report["teacher"]["accuracy"] - 0.05
    assert report["export"]["max_abs_diff"] <= 1e-4
    for name in ("student.onnx", "student.fp16.onnx", "student.int8.onnx"):
        sess = ort.InferenceSession(str(out / name))
        assert sess.get_outputs()[0].name == "scores" and sess.get_outputs()[0].shape == ["batch", *shape]
        (y,) = sess.run(None, {"x": digits["x_test"]})
        assert y.shape == (len(digits["x_test"]), *shape)
    (y,) = ort.InferenceSession(str(out / "student.onnx")).run(None, {"x": digits["x_test"]})
    accuracy = float((y.reshape(len(y), -1).argmax(1) == digits["y_test"]).mean())
    assert accuracy == pytest.approx(report["student"]["accuracy"])
    # the stand-alone export reads the shape from student.pt
    again = tmp_path / "again.onnx"
    result = CliRunner().invoke(cli, ["export", str(out / "student.pt"), "--out", str(again)])
    assert result.exit_code == 0, result.output
    assert ort.InferenceSession(str(again)).get_outputs()[0].shape == ["batch", *shape]


class Conv1x1Head(nn.Module):
    """A torch classifier whose last layer is a 1x1 convolution: scores (N, 10, 1, 1)."""

    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        self.head = nn.Conv2d(64, 10, 1, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(w.T.copy()).view(10, 64, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.view(-1, 64, 1, 1))


def test_torchscript_teacher_of_four_d_scores(tmp_path, digits, digits_files, weights):
    path = tmp_path / "t.pt"
    torch.jit.save(torch.jit.script(Conv1x1Head(weights).eval()), str(path))
    args = ["distill", str(path), "--data", str(digits_files["x"]), "--out", str(tmp_path / "out"), "--width",
            "256", "--rank", "16", "--epochs", "5", "--bench-seconds", "0.05", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fidelity"]["agreement"] > 0.8


def test_scores_that_are_not_a_vector_are_refused(tmp_path, digits, digits_files):
    w = np.zeros((64, 20), np.float32)
    teacher = shaped_teacher(tmp_path / "t.onnx", w, (10, 2))
    one_line_exit_2(["distill", str(teacher), "--data", str(digits_files["x"]), "--out", str(tmp_path / "o")],
                    "t.onnx", "(1, 10, 2)", "expected (N, classes)")
