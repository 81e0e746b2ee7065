import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compress.errors import ExportError
from compress.exporters import onnx as exporter
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
