"""Issue 14: students in the paper's notation, convolutional ones included, from one layer list."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

from compress.cli import cli
from compress.plan import student_config
from compress.student import StudentConfig, build_student, count_params, parse_spec
from tests.conftest import export_teacher, train_classifier


def test_spec_and_width_rank_are_one_student():
    a = student_config((1845,), 183, 8000, 250)
    b = student_config((1845,), 183, 0, None, "250L-8k")
    assert a == b and count_params(a) == count_params(b) == 1845 * 250 + 250 * 8000 + 8000 + 8000 * 183 + 183
    assert student_config((40,), 10, 8000, 0) == student_config((40,), 10, 1, None, "8k")
    assert b.spec == "250L-8k" and student_config((40,), 10, 0, None, "400k").spec == "400k"


@pytest.mark.parametrize("shape,spec,head", [
    ((3, 32, 32), "64c-p-1200L-30k", 64 * 16 * 16),  # the paper's CIFAR-10 SNN-CNN-MIMIC
    ((3, 32, 32), "32c3-32c3-p-64c3-p-256L-4k", 64 * 8 * 8),  # Urban et al.'s shape
    ((40,), "32c5-p-4k", 32 * 20),  # MNIST-1D: a flat signal is one channel
    ((2, 50), "8c-p5-1k", 8 * 10),  # (C, L): 1-D over C channels
])
def test_the_layer_list_drives_the_module_and_the_count(shape, spec, head):
    cfg = student_config(shape, 10, 0, None, spec)
    model = build_student(cfg)
    assert cfg.head_dim == head
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())  # buffers (norm) not counted
    assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("spec,token", [("64c-8k-p", "8k"), ("x-8k", "x"), ("64c4-8k", "64c4"),
                                        ("250L-p-8k", "250L"), ("8c-p64-1k", "p64"), ("8c-", "")])
def test_malformed_specs_name_the_token(spec, token):
    from compress.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--student {spec}"):
        student_config((40,), 10, 0, None, spec)
    if token:
        with pytest.raises(ConfigError, match=f"'{token}'"):
            student_config((40,), 10, 0, None, spec)


class ImageCNN(nn.Module):
    """The digits as (1, 8, 8) images: a teacher whose input is an image, channels first."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 8, 8) -> (N, 10)
        return self.net(x)


def test_image_teacher_conv_student_ships(tmp_path, digits):
    img = digits["x"].reshape(-1, 1, 8, 8)
    teacher = train_classifier(ImageCNN(), img, digits["y"])
    export_teacher(teacher, img, tmp_path / "t.onnx", input_name="pixels", output_name="scores")
    rng = np.random.default_rng(0)  # 3,600 transfer images: the digits and two jittered copies
    x = np.concatenate([img, *(img + rng.normal(0, 0.05, img.shape).astype(np.float32) for _ in range(2))])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "xt.npy", digits["x_test"].reshape(-1, 1, 8, 8))
    np.save(tmp_path / "yt.npy", digits["y_test"])
    r = CliRunner().invoke(cli, [
        "distill", str(tmp_path / "t.onnx"), "--data", str(tmp_path / "x.npy"), "--eval-data",
        str(tmp_path / "xt.npy"), "--eval-labels", str(tmp_path / "yt.npy"), "--student", "16c-p-32L-512",
        "--epochs", "30", "--precision", "fp16,int8", "--quantize", "static", "--bench-seconds", "0.01",
        "--out", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["student"]["spec"] == "16c3-p2-32L-512"
    assert rep["export"]["max_abs_diff"] <= 1e-4
    assert rep["student"]["accuracy"] >= rep["teacher"]["accuracy"] - 0.05, (rep["student"], rep["teacher"])
    assert {e["precision"]: e["agreement_with_fp32"] >= 0.99 for e in rep["exports"]} == {"fp16": True,
                                                                                         "int8": True}
    m = onnx.load(str(tmp_path / "run" / "student.onnx"))
    ops = [n.op_type for n in m.graph.node]
    assert "Conv" in ops and "MaxPool" in ops
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert m.graph.input[0].name == "pixels" and dims == ["batch", 1, 8, 8]
    assert m.graph.output[0].name == "scores"
    # the initializers are the counted parameters plus the two normalization constants per input feature
    numel = sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert numel == rep["student"]["params"] + 2 * 64


def test_standardization_is_exact_at_the_padded_borders(tmp_path):
    """A convolutional student standardizes inside the model, before the zero padding: inputs with
    extreme values on the border give the same logits from the ONNX file as from torch, and as a
    float64 evaluation of (x - mean) * scale followed by the convolution over zero padding."""
    from compress.exporters.onnx import export_onnx
    from compress.teachers import Signature

    cfg = StudentConfig((2, 6, 6), 3, 16, 4, parse_spec("4c3-p-4L-16")[0])
    torch.manual_seed(0)
    model = build_student(cfg).eval()
    with torch.no_grad():
        model.norm.mean.copy_(torch.tensor([5.0, -3.0]).view(2, 1, 1).expand(2, 6, 6))
        model.norm.scale.copy_(torch.tensor([0.5, 2.0]).view(2, 1, 1).expand(2, 6, 6))
    x = np.random.default_rng(0).normal(0, 1, (64, 2, 6, 6)).astype(np.float32)
    x[:, :, 0, :] = 40.0  # the top row far from the mean
    x[:, :, :, -1] = -40.0
    res = export_onnx(model, cfg, Signature("x", (2, 6, 6), "float32", "y", None), tmp_path / "s.onnx", x)
    assert res.max_abs_diff <= 1e-4 and res.max_abs_diff_fp64 <= 1e-4
    xs = (torch.from_numpy(x).double() - torch.tensor([5.0, -3.0]).double().view(1, 2, 1, 1)) * \
        torch.tensor([0.5, 2.0]).double().view(1, 2, 1, 1)
    conv = nn.functional.conv2d(xs, model.conv0.weight.double(), model.conv0.bias.double(), padding=1)
    h = nn.functional.max_pool2d(conv.clamp_min(0), 2).flatten(1)
    h = (h @ model.bottleneck.weight.double().T) @ model.hidden.weight.double().T + model.hidden.bias.double()
    ref = h.clamp_min(0) @ model.out.weight.double().T + model.out.bias.double()
    with torch.no_grad():
        got = model(torch.from_numpy(x)).double()
    assert torch.allclose(got, ref, atol=1e-4)


def test_sweep_over_specs_with_a_series_per_family(tmp_path, digits_files):
    """`sweep --students`: conv and MLP students side by side, each family its own series, and the
    same students trained on labels."""
    f = digits_files
    r = CliRunner().invoke(cli, [
        "sweep", str(f["teacher"]), "--data", str(f["x"]), "--eval-data", str(f["x_test"]), "--eval-labels",
        str(f["y_test"]), "--train-labels", str(f["y"]), "--students", "8c-p-256,8c-8c-p-256,16L-256",
        "--epochs", "8", "--bench-seconds", "0.01", "--out", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    runs = json.loads(r.stdout)["runs"]
    assert [(x["kind"], x["spec"]) for x in runs] == [
        ("mimic", "8c3-p2-256"), ("mimic", "8c3-8c3-p2-256"), ("mimic", "16L-256"),
        ("labels", "8c3-p2-256"), ("labels", "8c3-8c3-p2-256"), ("labels", "16L-256")]
    assert all(x["accuracy"] > 0.8 for x in runs), runs
    assert (tmp_path / "s" / "s_8c-p-256" / "student.onnx").exists()
    from compress.sweep import series

    assert set(series(json.loads(r.stdout))) == {
        "SNN-CNN-MIMIC", "2-conv MIMIC", "SNN-MIMIC, rank 16", "SNN-CNN-MIMIC shape on labels",
        "2-conv MIMIC shape on labels", "shallow net on labels"}
    both = CliRunner().invoke(cli, ["sweep", str(f["teacher"]), "--data", str(f["x"]), "--students", "8k",
                                    "--widths", "1k"])
    assert both.exit_code == 2 and "--students" in both.stderr


def test_inspect_says_which_convolution(tmp_path):
    from compress.demo import teacher_path

    r = CliRunner().invoke(cli, ["inspect", str(teacher_path()), "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["student_convolution"].startswith("1-D over one channel of length 40")


@pytest.mark.parametrize("shape,spec", [
    ((13,), "3c5-p-2c3-p3-4L-8"),  # 1-D, one channel, odd lengths: pooling drops a remainder
    ((2, 11), "3c3-p2-4L-8"),  # (C, L)
    ((2, 7, 9), "3c3-p-2c5-4L-8"),  # 2-D, odd sides
    ((1, 6, 6), "2c3-p3-8"),  # window 3, no bottleneck
    ((9,), "2c3-2c3-p1-8"),  # conv after conv (its own ReLU), a window of 1
])
def test_the_channels_last_front_matches_torch_conv_and_pool_with_ties(shape, spec):
    """compress.conv's hand-written convolution + ReLU and max pooling, values and every gradient, against
    F.conv*d / relu / max_pool*d in float64 (a conv's ReLU runs after the pooling that follows it).
    Small integer inputs and weights make ties in the pooling
    windows common (a blank patch gives equal outputs): the gradient must go where torch sends it."""
    torch.manual_seed(0)
    cfg = student_config(shape, 3, 0, None, spec)
    model = build_student(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape))
    x = torch.randint(0, 2, (4, *shape)).double()
    x[:, ..., :3] = 1.0  # a constant patch: equal values inside pooling windows
    d = len(shape) - 1 if len(shape) > 1 else 1
    conv, pool = (F.conv2d, F.max_pool2d) if d == 2 else (F.conv1d, F.max_pool1d)

    def reference(x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], *((1,) if len(shape) == 1 else ()), *shape)
        for layer in cfg.layers():
            if layer.kind == "conv":
                m = getattr(model, layer.name)
                h = conv(h, m.weight, m.bias, padding=layer.kernel // 2).relu()
            elif layer.kind == "pool":
                h = pool(h, layer.size)
        h = h.flatten(1)
        if cfg.rank:
            h = h @ model.bottleneck.weight.T
        return model.out(model.hidden(h).relu())

    ours = model(x)
    grads = torch.autograd.grad(ours.square().sum(), list(model.parameters()))
    ref = reference(x)
    expected = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    assert torch.equal(ours, ref)
    for (name, _), a, b in zip(model.named_parameters(), grads, expected, strict=True):
        assert torch.equal(a, b), name
