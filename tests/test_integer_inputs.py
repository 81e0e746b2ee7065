"""Teachers of integer inputs (uint8 pixels, the most common production image model): the student takes
the same uint8 tensor and casts it in its first node; the data must be whole numbers in the type's
range; augmentation, quantization and bench keep to the type."""

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
from compress.errors import DataError
from tests.conftest import DigitsCNN, train_classifier
from tests.test_teacher_kinds import one_line_exit_2

SCALE = 15  # digits' values 0..16 as pixels 0..240


class PixelCNN(nn.Module):
    """The digits CNN behind a uint8 (N, 1, 8, 8) input: pixels / 240 are the digits' [0, 1] values."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 1, 8, 8) uint8
        return self.net(x.float().div(16 * SCALE).flatten(1))


def pixels(x: np.ndarray) -> np.ndarray:
    return np.rint(x * 16 * SCALE).astype(np.uint8).reshape(-1, 1, 8, 8)


@pytest.fixture(scope="module")
def pixel_files(tmp_path_factory, digits):
    folder = tmp_path_factory.mktemp("pixels")
    net = train_classifier(DigitsCNN(), digits["x"], digits["y"], seed=0)
    sample = torch.from_numpy(pixels(digits["x"][:2]))
    path = folder / "pixels.onnx"
    torch.onnx.export(PixelCNN(net).eval(), (sample,), str(path), dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17)
    files = {"teacher": path, "x": folder / "x.npy", "x_test": folder / "xt.npy", "y_test": folder / "yt.npy"}
    np.save(files["x"], pixels(digits["x"]))
    np.save(files["x_test"], pixels(digits["x_test"]))
    np.save(files["y_test"], digits["y_test"])
    return files


def distill(files, out, *extra):
    args = ["distill", str(files["teacher"]), "--data", str(files["x"]), "--eval-data", str(files["x_test"]),
            "--eval-labels", str(files["y_test"]), "--out", str(out), "--bench-seconds", "0.05", "--json",
            *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_teacher_takes_uint8(pixel_files):
    sess = ort.InferenceSession(str(pixel_files["teacher"]))
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    result = CliRunner().invoke(cli, ["inspect", str(pixel_files["teacher"])])
    assert result.exit_code == 0, result.output
    assert "not usable" not in result.output


def test_uint8_teacher_gives_a_uint8_student(tmp_path, pixel_files, digits):
    out = tmp_path / "out"
    report = distill(pixel_files, out, "--width", "512", "--rank", "32", "--precision", "fp16,int8",
                     "--quantize", "static")
    assert report["teacher"]["accuracy"] > 0.85
    assert report["student"]["accuracy"] >= report["teacher"]["accuracy"] - 0.05
    assert report["export"]["max_abs_diff"] <= 1e-4
    sess = ort.InferenceSession(str(out / "student.onnx"))
    inp = sess.get_inputs()[0]
    assert (inp.name, inp.type, inp.shape) == ("image", "tensor(uint8)", ["batch", 1, 8, 8])
    assert onnx.load(str(out / "student.onnx")).graph.node[0].op_type == "Cast"
    (logits,) = sess.run(None, {"image": pixels(digits["x_test"])})
    accuracy = float((logits.argmax(1) == digits["y_test"]).mean())
    assert accuracy == pytest.approx(report["student"]["accuracy"])
    by = {e["precision"]: e for e in report["exports"]}
    assert by["int8"]["agreement_with_fp32"] >= 0.95 and by["fp16"]["agreement_with_fp32"] >= 0.99
    for p in ("fp16", "int8"):
        s = ort.InferenceSession(str(out / f"student.{p}.onnx"))
        assert s.get_inputs()[0].type == "tensor(uint8)"
    # the stand-alone export takes its calibration data in the teacher's type too
    result = CliRunner().invoke(cli, ["export", str(out / "student.pt"), "--out", str(tmp_path / "s8.onnx"),
                                      "--precision", "int8", "--quantize", "static", "--data",
                                      str(pixel_files["x_test"])])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["agreement_with_fp32"] >= 0.95
    # bench makes its own inputs in the type's range
    result = CliRunner().invoke(cli, ["bench", str(out / "student.onnx"), "--batch-sizes", "1",
                                      "--seconds", "0.05", "--json"])
    assert result.exit_code == 0, result.output


def test_conv_student_of_a_uint8_teacher(tmp_path, pixel_files):
    out = tmp_path / "out"
    report = distill(pixel_files, out, "--student", "8c3-p-16L-256", "--epochs", "40",
                     "--augment", "munge:2")
    assert report["student"]["accuracy"] >= report["teacher"]["accuracy"] - 0.08
    model = onnx.load(str(out / "student.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops[0] == "Cast" and "Conv" in ops and "MaxPool" in ops
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    (syn,) = out.glob("augmented_*.npy")
    made = np.load(syn)
    assert made.dtype == np.uint8 and len(made) > 0


def test_data_must_be_whole_numbers_in_range(tmp_path, pixel_files, digits):
    x = pixels(digits["x"]).astype(np.float32)  # whole numbers held as floats: fine
    np.save(tmp_path / "xf.npy", x)
    result = CliRunner().invoke(cli, ["compare", str(pixel_files["teacher"]), str(pixel_files["teacher"]),
                                      "--data", str(tmp_path / "xf.npy"), "--json"])
    assert result.exit_code == 0, result.output
    for bad, value in ((256.0, "256.0"), (-1.0, "-1.0"), (2.5, "2.5")):
        y = x.copy()
        y[7, 0, 3, 3] = bad
        np.save(tmp_path / "bad.npy", y)
        out = tmp_path / f"out{value}"
        line = one_line_exit_2(["distill", str(pixel_files["teacher"]), "--data", str(tmp_path / "bad.npy"),
                                "--out", str(out)], "--data", "bad.npy", "uint8", "row 7", value)
        assert "0 to 255" in line
        assert not (out / "targets.npy").exists()


def test_check_integers():
    from compress.data import check_integers

    check_integers(np.arange(256, dtype=np.int16).reshape(16, 16), np.dtype(np.uint8), "a.npy")
    check_integers(np.zeros((3, 2), dtype=np.uint8), np.dtype(np.int16), "a.npy")  # fits by its type
    with pytest.raises(DataError, match=r"a\.npy: .*int8 .* -128 to 127.*row 1 holds 200"):
        check_integers(np.array([[1, 2], [200, 3]], dtype=np.int16), np.dtype(np.int8), "a.npy")


def test_augmented_pixels_stay_pixels(tmp_path):
    from compress.augment import generate

    x = np.random.default_rng(0).integers(0, 256, (50, 1, 4, 4)).astype(np.uint8)
    for method in ("munge", "noise", "mixup"):
        made = generate(x, method, 3, tmp_path / f"{method}.npy", seed=0)
        assert made.dtype == np.uint8 and made.shape == (100, 1, 4, 4)
        assert made.astype(np.float64).std() > 0  # not all clipped to one value


def test_float16_teacher_with_static_int8(tmp_path, digits):
    """A teacher of float16 inputs: the calibration (and every other run of an export) feeds float16."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["xf", "w"], ["logits"])]
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 64])
    y_out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    graph = helper.make_graph(nodes, "t", [x_in], [y_out], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "f16.onnx")
    np.save(tmp_path / "x.npy", digits["x"])
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["distill", str(tmp_path / "f16.onnx"), "--data",
                                      str(tmp_path / "x.npy"), "--out", str(out), "--width", "256", "--rank",
                                      "16", "--epochs", "5",
                                      "--precision", "fp16,int8", "--quantize", "static", "--bench-seconds",
                                      "0.05", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {e["precision"] for e in report["exports"]} == {"fp16", "int8"}
    for name in ("student.onnx", "student.fp16.onnx", "student.int8.onnx"):
        assert ort.InferenceSession(str(out / name)).get_inputs()[0].type == "tensor(float16)"


def test_targets_then_fit_on_pixels(tmp_path, pixel_files, digits):
    """`compress targets` then `compress fit` (no teacher): uint8 data gives a student of uint8 input."""
    z = tmp_path / "z.npy"
    result = CliRunner().invoke(cli, ["targets", str(pixel_files["teacher"]), "--data", str(pixel_files["x"]),
                                      "--out", str(z)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "fit"
    result = CliRunner().invoke(cli, ["fit", "--data", str(pixel_files["x"]), "--targets", str(z), "--width",
                                      "512", "--rank", "32", "--out", str(out), "--input-name", "image",
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fidelity"]["agreement"] >= 0.9
    sess = ort.InferenceSession(str(out / "student.onnx"))
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    (logits,) = sess.run(None, {"image": pixels(digits["x_test"])})
    assert float((logits.argmax(1) == digits["y_test"]).mean()) >= 0.85


def test_ensemble_of_a_uint8_and_a_float_teacher(tmp_path, pixel_files, digits):
    """The uint8 member decides the data's type (and the student's input); the float member reads the
    same pixels as floats."""
    net = train_classifier(DigitsCNN(), digits["x"], digits["y"], seed=1)
    floats = tmp_path / "floats.onnx"
    torch.onnx.export(PixelCNN(net).eval(), (torch.from_numpy(pixels(digits["x"][:2])).float(),), str(floats),
                      dynamo=False, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    out = tmp_path / "out"
    args = ["distill", str(floats), str(pixel_files["teacher"]), "--data", str(pixel_files["x"]), "--out",
            str(out), "--width", "256", "--rank", "16", "--epochs", "5", "--bench-seconds", "0.05", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert ort.InferenceSession(str(out / "student.onnx")).get_inputs()[0].type == "tensor(uint8)"
    assert json.loads(result.stdout)["fidelity"]["agreement"] > 0.8
