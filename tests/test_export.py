import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compress.errors import ExportError
from compress.exporters import onnx as exporter
from compress.onnxfiles import external_files
from compress.student import StudentConfig, build_student
from compress.teachers import Signature


@pytest.mark.parametrize("shape,rank,dtype", [((16,), 4, "float32"), ((16,), 0, "float32"),
                                               ((2, 3, 4), 5, "float32"), ((16,), 4, "float64")])
def test_export_is_a_drop_in(tmp_path, shape, rank, dtype):
    torch.manual_seed(0)
    cfg = StudentConfig(shape, 7, 64, rank)
    model = build_student(cfg).eval()
    sig = Signature("pixels", shape, dtype, "scores", None)
    x = np.random.default_rng(0).standard_normal((50, *shape)).astype(np.float32)
    res = exporter.export_onnx(model, cfg, sig, tmp_path / "s.onnx", x)
    assert res.max_abs_diff <= 1e-5
    m = onnx.load(str(tmp_path / "s.onnx"))
    inp = m.graph.input[0]
    assert inp.name == "pixels"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", *shape]
    assert [o.name for o in m.graph.output] == ["scores"]
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3, 50):  # the batch axis is dynamic
        (y,) = sess.run(None, {"pixels": x[:n].astype(dtype)})
        with torch.no_grad():
            np.testing.assert_allclose(y, model(torch.from_numpy(x[:n])).numpy(), rtol=1e-4, atol=1e-5)
    assert list(tmp_path.iterdir()) == [tmp_path / "s.onnx"]  # no temporary file left


def test_failed_parity_keeps_no_file(tmp_path, monkeypatch):
    cfg = StudentConfig((8,), 3, 16, 2)
    model = build_student(cfg).eval()
    sig = Signature("x", (8,), "float32", "y", None)
    real = exporter.student_to_onnx

    def corrupted(model, cfg, sig):
        proto = real(model, cfg, sig)
        proto.graph.initializer[-1].raw_data = np.full(3, 5.0, np.float32).tobytes()  # out.bias
        return proto

    monkeypatch.setattr(exporter, "student_to_onnx", corrupted)
    with pytest.raises(ExportError, match="disagrees with the torch student: 'y': max abs diff"):
        exporter.export_onnx(model, cfg, sig, tmp_path / "s.onnx", np.ones((4, 8), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_large_weights_go_beside_the_model_and_replace_cleanly(tmp_path, monkeypatch):
    """Over EXTERNAL_OVER bytes (2 GiB is protobuf's limit) the weights are written to one file beside
    the model; a later export replaces both, whatever size it has, and leaves nothing stale."""
    torch.manual_seed(0)
    cfg = StudentConfig((16,), 7, 64, 4)
    model = build_student(cfg).eval()
    sig = Signature("x", (16,), "float32", "y", None)
    x = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    path = tmp_path / "s.onnx"
    big = exporter.export_onnx(model, cfg, sig, path, x, external_over=1000)
    (data,) = external_files(path)
    assert data.parent == tmp_path and data.name.startswith("s.onnx.") and data.suffix == ".data"
    assert sorted(tmp_path.iterdir()) == sorted([path, data])  # no temporary folder left
    assert path.stat().st_size < 2000 < data.stat().st_size  # the weights are in the data file
    assert big.size_bytes == path.stat().st_size + data.stat().st_size and big.max_abs_diff <= 1e-5
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], model(torch.from_numpy(x)).numpy(),
                                   rtol=1e-4, atol=1e-5)

    again = exporter.export_onnx(model, cfg, sig, path, x, external_over=1000)  # a new data file
    (data2,) = external_files(path)
    assert data2 != data and sorted(tmp_path.iterdir()) == sorted([path, data2])
    small = exporter.export_onnx(model, cfg, sig, path, x)  # self-contained again: the data file goes
    assert list(tmp_path.iterdir()) == [path] and small.size_bytes == path.stat().st_size
    assert again.size_bytes == big.size_bytes

    def failing(*args):
        raise ExportError("exported ONNX disagrees with the torch student", ["forced"])

    monkeypatch.setattr(exporter, "_check", failing)
    with pytest.raises(ExportError):
        exporter.export_onnx(model, cfg, sig, path, x, external_over=1000)
    assert list(tmp_path.iterdir()) == [path]  # the old model kept, no data file, no folder


def test_precision_exports_of_large_weights(tmp_path, monkeypatch):
    from compress.exporters.quantize import export_precision, fp32_file

    torch.manual_seed(0)
    cfg = StudentConfig((16,), 7, 64, 4)
    model = build_student(cfg).eval()
    sig = Signature("x", (16,), "float32", "y", None)
    x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    monkeypatch.setattr(exporter, "EXTERNAL_OVER", 1000)
    monkeypatch.setattr(exporter.save, "__defaults__", (1000,))
    for precision, method in [("fp16", "weights"), ("int8", "weights"), ("int8", "dynamic")]:
        out = tmp_path / f"{precision}-{method}" / "s.onnx"
        with fp32_file(exporter.student_to_onnx(model, cfg, sig)) as fp32:
            res = export_precision(fp32, out, precision, x, 0.9, method)
        files = external_files(out)
        if method == "weights":  # onnxruntime's quantizer decides for itself what goes beside
            assert len(files) == 1, (precision, method, sorted(out.parent.iterdir()))
        assert sorted(out.parent.iterdir()) == sorted([out, *files])  # nothing else, nothing stale
        assert res["size_bytes"] == out.stat().st_size + sum(f.stat().st_size for f in files)
        assert res["agreement_with_fp32"] >= 0.9


@pytest.mark.slow
def test_a_student_over_2_gib_exports(tmp_path):
    """608M weights (2.4 GB): one protobuf message cannot hold them; ~25 s and ~7 GB of memory."""
    torch.manual_seed(0)
    cfg = StudentConfig((1845,), 183, 300_000, 0)
    model = build_student(cfg).eval()
    sig = Signature("x", (1845,), "float32", "y", None)
    x = np.random.default_rng(0).standard_normal((64, 1845)).astype(np.float32)
    res = exporter.export_onnx(model, cfg, sig, tmp_path / "s.onnx", x)
    (data,) = external_files(tmp_path / "s.onnx")
    assert res.size_bytes > 2**31 and data.stat().st_size > 2**31 and res.max_abs_diff <= 1e-4
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "s.onnx", data])


def test_a_teacher_with_weights_beside_it_counts_them(tmp_path):
    from compress.teachers import load_teacher

    torch.manual_seed(0)
    cfg = StudentConfig((16,), 7, 64, 4)
    sig = Signature("x", (16,), "float32", "y", None)
    x = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    model = build_student(cfg).eval()
    res = exporter.export_onnx(model, cfg, sig, tmp_path / "s.onnx", x, external_over=1000)
    teacher = load_teacher([tmp_path / "s.onnx"])
    assert teacher.size_bytes == res.size_bytes > (tmp_path / "s.onnx").stat().st_size
    assert teacher.logits(x).shape == (50, 7)
