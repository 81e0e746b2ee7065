"""Issue 6: quantized exports, bench, compare, and the report's plot."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from compress.cli import cli
from compress.plot import plot_report
from tests.test_distill import distilled  # noqa: F401  (the shared distill run)


def exports(report):
    return {e["precision"]: e for e in report["exports"]}


def test_int8_and_fp16_keep_accuracy(distilled):  # noqa: F811
    out, _ = distilled
    r = json.loads((out / "report.json").read_text())
    ex = exports(r)
    fp32_size, fp32_acc = r["student"]["size_bytes"], r["student"]["accuracy"]
    assert ex["int8"]["size_bytes"] <= 0.35 * fp32_size
    assert abs(ex["int8"]["accuracy"] - fp32_acc) <= 0.01
    assert ex["fp16"]["size_bytes"] <= 0.55 * fp32_size
    assert abs(ex["fp16"]["accuracy"] - fp32_acc) <= 0.005
    for e in ex.values():
        assert e["agreement_with_fp32"] >= 0.99
        assert (out / f"student.{e['precision']}.onnx").exists()


def test_low_precision_exports_keep_the_float32_interface(distilled, digits):  # noqa: F811
    out, _ = distilled
    for p in ("fp16", "int8"):
        sess = ort.InferenceSession(str(out / f"student.{p}.onnx"), providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_inputs()[0].name == "x"
        assert sess.get_outputs()[0].type == "tensor(float)" and sess.get_outputs()[0].name == "logits"
        (y,) = sess.run(None, {"x": digits["x_test"][:3]})
        assert y.shape == (3, 10) and y.dtype == np.float32


@pytest.mark.parametrize("quantize", ["weights", "static"])
def test_export_command_int8(distilled, tmp_path, quantize):  # noqa: F811
    out, _ = distilled
    result = CliRunner().invoke(cli, ["export", str(out / "student.pt"), "--out", str(tmp_path / "s8.onnx"),
                                      "--precision", "int8", "--quantize", quantize])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["agreement_with_fp32"] >= 0.99
    assert info["size_bytes"] <= 0.4 * (out / "student.onnx").stat().st_size


def near_tie_student(path):
    """A student whose logits differ by about 1e-4 between classes: dynamic int8 flips 4 of 256."""
    import torch

    from compress.student import StudentConfig, build_student, save_student

    torch.manual_seed(0)
    cfg = StudentConfig((64,), 10, 256, 16)
    model = build_student(cfg).eval()
    with torch.no_grad():
        model.out.weight.mul_(1e-3)
        model.out.bias.fill_(5.0)
    x = np.random.default_rng(0).random((256, 64)).astype(np.float32)
    sig = {"input_name": "x", "sample_shape": [64], "input_dtype": "float32", "output_name": "logits",
           "batch": None}
    save_student(model, cfg, str(path), {"signature": sig}, check_inputs=x)
    return path


def test_agreement_breach_leaves_no_file(tmp_path):
    # a real process: onnxruntime's quantizer logs to the root logger, which must not reach stderr
    student = near_tie_student(tmp_path / "student.pt")
    target = tmp_path / "s8.onnx"
    result = subprocess.run([sys.executable, "-m", "compress", "export", str(student), "--out",
                             str(target), "--precision", "int8", "--quantize", "dynamic",
                             "--min-agreement", "1.0"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --min-agreement: the int8 export agrees")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt"]
    ok = subprocess.run([sys.executable, "-m", "compress", "export", str(student), "--out", str(target),
                         "--precision", "fp16", "--min-agreement", "0.5"], capture_output=True, text=True)
    assert ok.returncode == 0 and target.exists()  # the same student passes a floor it can meet


def test_bad_precision_is_a_usage_error(distilled, tmp_path):  # noqa: F811
    out, _ = distilled
    result = CliRunner().invoke(cli, ["export", str(out / "student.pt"), "--out", str(tmp_path / "x.onnx"),
                                      "--precision", "int4"])
    assert result.exit_code == 2 and "--precision" in result.stderr


def test_compare_json(distilled, digits_files):  # noqa: F811
    out, _ = distilled
    f = digits_files
    result = CliRunner().invoke(cli, ["compare", str(f["teacher"]), str(out / "student.int8.onnx"), "--data",
                                      str(f["x_test"]), "--labels", str(f["y_test"]), "--json",
                                      "--batch-sizes", "1,8"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    report = json.loads((out / "report.json").read_text())
    assert r["teacher"]["accuracy"] == pytest.approx(report["teacher"]["accuracy"])
    assert r["student"]["accuracy"] == pytest.approx(exports(report)["int8"]["accuracy"])
    assert r["fidelity"]["agreement"] == pytest.approx(exports(report)["int8"]["agreement"])
    assert set(r["student"]["latency_ms"]) == {"1", "8"}


def test_bench_json(distilled):  # noqa: F811
    out, _ = distilled
    models = [str(out / "student.onnx"), str(out / "student.int8.onnx")]
    result = CliRunner().invoke(cli, ["bench", *models, "--batch-sizes", "1,64", "--json",
                                      "--seconds", "0.2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert [m["model"] for m in r["models"]] == models and r["threads"] == 1
    for m in r["models"]:
        for b in ("1", "64"):
            v = m["latency_ms"][b]
            assert 0 < v["p50"] <= v["p90"] <= v["p99"] and v["runs"] >= 30
    bad = CliRunner().invoke(cli, ["bench", models[0], "--batch-sizes", "1,x"])
    assert bad.exit_code == 2 and "--batch-sizes" in bad.stderr


@pytest.mark.slow
def test_bench_is_stable_at_batch_64(distilled):  # noqa: F811
    out, _ = distilled
    args = ["bench", str(out / "student.onnx"), "--batch-sizes", "64", "--json", "--seconds", "2"]
    a, b = (json.loads(CliRunner().invoke(cli, args).stdout)["models"][0]["latency_ms"]["64"]["p50"]
            for _ in range(2))
    assert abs(a - b) / min(a, b) <= 0.2


def test_report_plot_has_every_series(distilled, tmp_path):  # noqa: F811
    out, _ = distilled
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![accuracy and latency against parameters](report.png)" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert plot_report(report, tmp_path / "p.png") == ["teacher", "student", "student fp16", "student int8"]
