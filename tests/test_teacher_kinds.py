"""Issue 3: every kind of teacher, built here, distilled through the CLI to a student within 5 points."""

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
from tests.conftest import DigitsCNN, export_teacher, train_classifier

FAST = ["--width", "512", "--rank", "32", "--bench-seconds", "0.05", "--json"]


@pytest.fixture(scope="module")
def cnn(digits):
    return train_classifier(DigitsCNN(), digits["x"], digits["y"], seed=0)


def distill(tmp_path, teachers, digits_files, *extra, data=None, test_x=None):
    f = digits_files
    out = tmp_path / "out"
    args = ["distill", *map(str, teachers), "--data", str(data or f["x"]), "--eval-data",
            str(test_x or f["x_test"]), "--eval-labels", str(f["y_test"]), "--out", str(out), *FAST, *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["teacher"]["accuracy"] > 0.85
    assert report["student"]["accuracy"] >= report["teacher"]["accuracy"] - 0.05
    return report, out


def test_torchscript(tmp_path, cnn, digits, digits_files):
    path = tmp_path / "teacher.ts"
    torch.jit.save(torch.jit.trace(cnn, torch.from_numpy(digits["x"][:2])), str(path))
    report, out = distill(tmp_path, [path], digits_files)
    assert report["teacher"]["params"] == sum(p.numel() for p in cnn.parameters())
    sess = ort.InferenceSession(str(out / "student.onnx"))
    assert [i.name for i in sess.get_inputs()] == ["input"] and sess.get_inputs()[0].shape[1:] == [64]


def test_torch_export_program(tmp_path, cnn, digits, digits_files):
    path = tmp_path / "teacher.pt2"
    program = torch.export.export(cnn, (torch.from_numpy(digits["x"][:2]),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    distill(tmp_path, [path], digits_files)


def test_torch_export_with_a_fixed_batch(tmp_path, cnn, digits, digits_files):
    path = tmp_path / "teacher.pt2"
    torch.export.save(torch.export.export(cnn, (torch.from_numpy(digits["x"][:4]),)), str(path))
    distill(tmp_path, [path], digits_files)


def test_state_dict_with_arch(tmp_path, cnn, digits_files):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": cnn.state_dict(), "epoch": 3}, path)
    distill(tmp_path, [path], digits_files, "--arch", "tests.conftest:DigitsCNN")


def test_onnx_softmax_output(tmp_path, cnn, digits, digits_files):
    path = export_teacher(nn.Sequential(cnn, nn.Softmax(dim=1)).eval(), digits["x"], tmp_path / "p.onnx",
                          output_name="probs")
    report, out = distill(tmp_path, [path], digits_files)
    assert report["teacher"]["output_kind"] == "probabilities"
    assert ort.InferenceSession(str(out / "student.onnx")).get_outputs()[0].name == "probs"
    z = np.load(out / "targets.npy")
    np.testing.assert_allclose(z.mean(axis=1), 0, atol=1e-4)  # log(p), centred per row


@pytest.mark.parametrize("zipmap", [False, True])
def test_skl2onnx_classifier(tmp_path, digits, digits_files, zipmap):
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=1000).fit(digits["x"], digits["y"])
    proto = to_onnx(clf, digits["x"][:1], options={id(clf): {"zipmap": zipmap}}, target_opset=17)
    path = tmp_path / "skl.onnx"
    path.write_bytes(proto.SerializeToString())
    report, _ = distill(tmp_path, [path], digits_files)
    assert report["teacher"]["output_kind"] == "probabilities"
    assert report["teacher"]["output"] == ("output_probability" if zipmap else "probabilities")
    assert report["teacher"]["accuracy"] == pytest.approx(clf.score(digits["x_test"], digits["y_test"]))


@pytest.mark.parametrize("batch", [1, 3])
def test_fixed_batch_onnx(tmp_path, cnn, digits, digits_files, batch):
    path = tmp_path / f"b{batch}.onnx"
    torch.onnx.export(cnn, (torch.from_numpy(digits["x"][:batch]),), str(path), dynamo=False,
                      input_names=["x"], output_names=["logits"], opset_version=17)
    assert ort.InferenceSession(str(path)).get_inputs()[0].shape == [batch, 64]
    report, out = distill(tmp_path, [path], digits_files)
    sess = ort.InferenceSession(str(out / "student.onnx"))
    assert sess.get_inputs()[0].shape == ["batch", 64]  # the student takes any batch size


def test_mixed_ensemble(tmp_path, digits, digits_files):
    x, y = digits["x"], digits["y"]
    nets = [train_classifier(DigitsCNN(), x, y, steps=300, seed=s) for s in (1, 2, 3)]
    onnx_path = export_teacher(nets[0], x, tmp_path / "a.onnx")
    pt2 = tmp_path / "b.pt2"
    torch.export.save(torch.export.export(nets[1], (torch.from_numpy(x[:2]),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), str(pt2))
    ts = tmp_path / "c.ts"
    torch.jit.save(torch.jit.trace(nets[2], torch.from_numpy(x[:2])), str(ts))
    report, out = distill(tmp_path, [onnx_path, pt2, ts], digits_files)
    members = report["teacher"]["members"]
    assert [m["name"] for m in members] == ["a.onnx", "b.pt2", "c.ts"]
    assert all(m["accuracy"] > 0.8 for m in members)
    assert ort.InferenceSession(str(out / "student.onnx")).get_inputs()[0].name == "x"  # the ONNX member's


def test_ensemble_of_different_shapes_is_refused(tmp_path, cnn, digits, digits_files):
    a = export_teacher(cnn, digits["x"], tmp_path / "a.onnx")
    other = nn.Sequential(nn.Linear(32, 10)).eval()
    b = export_teacher(other, np.zeros((2, 32), np.float32), tmp_path / "b.onnx")
    result = CliRunner().invoke(cli, ["distill", str(a), str(b), "--data", str(digits_files["x"])])
    assert result.exit_code == 2 and "input shape" in result.stderr


class ImageCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = DigitsCNN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 1, 8, 8)
        return self.net(x.flatten(1))


def test_image_shaped_teacher(tmp_path, cnn, digits, digits_files):
    img = ImageCNN()
    img.net.load_state_dict(cnn.state_dict())
    images = digits["x"].reshape(-1, 1, 8, 8)
    path = export_teacher(img.eval(), images, tmp_path / "img.onnx", input_name="image")
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "xt.npy", digits["x_test"].reshape(-1, 1, 8, 8))
    report, out = distill(tmp_path, [path], digits_files, data=tmp_path / "x.npy",
                          test_x=tmp_path / "xt.npy")
    sess = ort.InferenceSession(str(out / "student.onnx"))
    assert sess.get_inputs()[0].name == "image" and sess.get_inputs()[0].shape == ["batch", 1, 8, 8]
    (logits,) = sess.run(None, {"image": digits["x_test"].reshape(-1, 1, 8, 8)})
    accuracy = float((logits.argmax(1) == digits["y_test"]).mean())
    assert accuracy == pytest.approx(report["student"]["accuracy"])


def test_teacher_of_any_image_size(tmp_path, cnn, digits, digits_files):
    """A teacher whose ONNX input leaves H and W free: the student keeps the data's size, and says so."""
    img = ImageCNN()
    img.net.load_state_dict(cnn.state_dict())
    images = digits["x"].reshape(-1, 1, 8, 8)
    path = tmp_path / "any.onnx"
    torch.onnx.export(img.eval(), (torch.from_numpy(images[:2]),), str(path), dynamo=False,
                      input_names=["image"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"image": {0: "batch", 2: "h", 3: "w"}, "logits": {0: "batch"}})
    assert [d.dim_param for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim] == [
        "batch", "", "h", "w"]
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "xt.npy", digits["x_test"].reshape(-1, 1, 8, 8))
    report, out = distill(tmp_path, [path], digits_files, data=tmp_path / "x.npy", test_x=tmp_path / "xt.npy")
    note = [n for n in report["train"]["notes"] if "any size" in n]
    assert len(note) == 1 and "axis 2, 3" in note[0] and "(N, 1, 8, 8)" in note[0], report["train"]["notes"]
    assert ort.InferenceSession(str(out / "student.onnx")).get_inputs()[0].shape == ["batch", 1, 8, 8]


def one_line_exit_2(args, *needles):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for n in needles:
        assert n in lines[0]
    return lines[0]


def test_garbage_pt(tmp_path, digits_files):
    path = tmp_path / "junk.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    one_line_exit_2(["distill", str(path), "--data", str(digits_files["x"])], "junk.pt", "not a PyTorch")


def test_state_dict_without_arch(tmp_path, cnn, digits_files):
    path = tmp_path / "sd.pt"
    torch.save(cnn.state_dict(), path)
    one_line_exit_2(["distill", str(path), "--data", str(digits_files["x"])], "sd.pt", "state dict", "--arch")
    one_line_exit_2(["distill", str(path), "--data", str(digits_files["x"]), "--arch", "tests.conftest:nope"],
                    "--arch", "no callable 'nope'")


def test_pickled_module_needs_opt_in(tmp_path, cnn, digits_files):
    path = tmp_path / "whole.pt"
    torch.save(cnn, path)
    line = one_line_exit_2(["distill", str(path), "--data", str(digits_files["x"])], "whole.pt",
                           "--trust-pickle")
    assert "run any code" in line
    result = CliRunner().invoke(cli, ["distill", str(path), "--data", str(digits_files["x"]),
                                      "--trust-pickle", "--out", str(tmp_path / "o"), *FAST])
    assert result.exit_code == 0, result.output


def test_unsupported_onnx_says_what_works(tmp_path):
    from tests.test_teachers import linear_onnx

    w, b = np.ones((4, 3)), np.zeros(3)
    line = one_line_exit_2(["distill", str(linear_onnx(tmp_path / "two.onnx", w, b, extra_inputs=1)),
                            "--data", str(tmp_path / "x.npy")], "2 inputs")
    assert "one float input" in line


def test_inspect(tmp_path, cnn, digits):
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=200).fit(digits["x"][:300], digits["y"][:300])
    path = tmp_path / "skl.onnx"
    path.write_bytes(to_onnx(clf, digits["x"][:1], target_opset=17).SerializeToString())
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    kinds = {o["name"]: o["looks_like"] for o in info["outputs"]}
    assert kinds == {"output_label": "labels", "output_probability": "probabilities"}
    assert info["distill_uses"] == "output_probability" and info["params"] == 64 * 10 + 10
    assert info["inputs"] == [{"name": "X", "shape": ["?", 64], "type": "tensor(float)"}]
    ts = tmp_path / "t.ts"
    torch.jit.save(torch.jit.trace(cnn, torch.from_numpy(digits["x"][:2])), str(ts))
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(ts), "--json"]).stdout)
    assert info["format"] == "torchscript" and info["params"] == sum(p.numel() for p in cnn.parameters())
    sd = tmp_path / "sd.pt"
    torch.save(cnn.state_dict(), sd)
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(sd), "--json"]).stdout)
    assert info["usable"] is False and "--arch" in info["why"]
    table = CliRunner().invoke(cli, ["inspect", str(path)])
    assert table.exit_code == 0 and "distill uses: output_probability" in table.stderr
