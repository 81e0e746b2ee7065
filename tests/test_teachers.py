import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.demo import teacher_path
from compress.errors import TeacherError
from compress.teachers import EnsembleTeacher, OnnxTeacher, load_teacher, onnx_param_count


def linear_onnx(path, w, b, batch="N", input_type=TensorProto.FLOAT, extra_inputs=0, softmax=False):
    """y = x @ w + b as a hand-made ONNX file, with a second output `probs` = softmax(y)."""
    d, c = w.shape
    inputs = [helper.make_tensor_value_info("x", input_type, [batch, d])]
    inputs += [helper.make_tensor_value_info(f"extra{i}", TensorProto.FLOAT, [batch, d])
               for i in range(extra_inputs)]
    nodes = []
    src = "x"
    if input_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        src = "xf"
    nodes += [helper.make_node("Gemm", [src, "w", "b"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, c]) for n in ("logits", "probs")]
    if softmax:
        outputs.reverse()
    graph = helper.make_graph(nodes, "lin", inputs, outputs,
                              [numpy_helper.from_array(w.astype(np.float32), "w"),
                               numpy_helper.from_array(b.astype(np.float32), "b"),
                               numpy_helper.from_array(np.array([1, 2], np.int64), "unused_shape")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 6)).astype(np.float32)
    return rng.standard_normal((6, 4)), rng.standard_normal(4), x


def test_param_count_ignores_integer_initializers(tmp_path, weights):
    w, b, _ = weights
    assert onnx_param_count(linear_onnx(tmp_path / "t.onnx", w, b)) == 6 * 4 + 4
    assert onnx_param_count(teacher_path()) == 8010  # the demo CNN: torch counts 8,010 parameters


@pytest.mark.parametrize("batch", [1, 3, "N"])
def test_fixed_batch_sizes_are_padded(tmp_path, weights, batch):
    w, b, x = weights
    t = OnnxTeacher(linear_onnx(tmp_path / "t.onnx", w, b, batch=batch))
    assert t.signature.batch == (None if batch == "N" else batch)
    np.testing.assert_allclose(t.logits(x, batch_size=5), x @ w + b, rtol=1e-5, atol=1e-5)


def test_output_choice(tmp_path, weights):
    w, b, x = weights
    path = linear_onnx(tmp_path / "t.onnx", w, b, softmax=True)  # probs listed first
    assert OnnxTeacher(path).signature.output_name == "probs"
    t = OnnxTeacher(path, output="logits")
    np.testing.assert_allclose(t.logits(x), x @ w + b, rtol=1e-5, atol=1e-5)
    with pytest.raises(TeacherError, match="--output: .* has no output 'nope'"):
        OnnxTeacher(path, output="nope")


def test_double_input_teacher(tmp_path, weights):
    w, b, x = weights
    t = OnnxTeacher(linear_onnx(tmp_path / "t.onnx", w, b, input_type=TensorProto.DOUBLE))
    assert t.signature.input_dtype == "float64"
    np.testing.assert_allclose(t.logits(x), x @ w + b, rtol=1e-5, atol=1e-5)


def test_unsupported_teachers_say_why(tmp_path, weights):
    w, b, _ = weights
    with pytest.raises(TeacherError, match="has 2 inputs"):
        OnnxTeacher(linear_onnx(tmp_path / "two.onnx", w, b, extra_inputs=1))
    with pytest.raises(TeacherError, match="is tensor\\(int64\\)"):
        OnnxTeacher(linear_onnx(tmp_path / "int.onnx", w, b, input_type=TensorProto.INT64))
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(TeacherError, match="not a PyTorch or ONNX model file"):
        load_teacher([tmp_path / "m.pt"])


def test_ensemble_is_the_mean(tmp_path, weights):
    w, b, x = weights
    a = linear_onnx(tmp_path / "a.onnx", w, b)
    c = linear_onnx(tmp_path / "c.onnx", -w, b + 1)
    t = load_teacher([a, c])
    assert isinstance(t, EnsembleTeacher) and t.params == 2 * 28
    np.testing.assert_allclose(t.logits(x), np.broadcast_to(b + 0.5, (23, 4)), rtol=1e-5, atol=1e-5)
    other = linear_onnx(tmp_path / "o.onnx", np.ones((5, 4)), b)
    with pytest.raises(TeacherError, match="input shape"):
        load_teacher([a, other])
