"""Smaller exports of a validated fp32 student: fp16 weights, or int8 through onnxruntime's quantizer.

- fp16: weights stored as float16 and cast to float32 inside the graph, so the interface (float32 in,
  float32 out) and the arithmetic stay those of the fp32 model; the file is half the size.
- int8, `weights` (default): int8 weights with one float scale per output unit, dequantized inside the
  graph (DequantizeLinear); arithmetic stays float32, the file is under a third of the size. The first
  layer gets one scale per *input feature* instead: fitting folds the input standardization (x / sd)
  into its columns, so their sizes differ by orders of magnitude (0.12 to 45 on the digits test
  teacher), and a scale per output unit crushed the small columns (96.7% agreement, against 100%).
- int8, `dynamic`: `onnxruntime.quantization.quantize_dynamic`, int8 arithmetic (MatMulInteger), weights
  per output channel, activations quantized per batch on the fly. The bottleneck layer (D x k, small)
  stays float32 for the reason above, and so does a conv student's standardization (KEEP_FP32).
- int8, `static`: `quantize_static` in QDQ format, activation ranges calibrated on transfer inputs;
  KEEP_FP32 likewise, and the Gemms' outputs (the logits among them) are left unquantized.

Every export is compared with the fp32 model on held-out inputs; below `min_agreement` top-1 agreement
it raises `ExportError` and the file is never written.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ConfigError, ExportError

PRECISIONS = ("fp32", "fp16", "int8")
MIN_AGREEMENT = 0.99  # default floor of top-1 agreement with the fp32 student
_CALIBRATION_SAMPLES = 512
# Nodes that `dynamic` and `static` leave in float32: the input's standardization (a convolutional
# student's norm) and the bottleneck (its columns' scales differ by orders of magnitude, see above).
# `static` also leaves the Gemms' outputs unquantized (weights int8): quantizing the logits themselves
# to one int8 scale was the largest error (max |diff| 1.42 against 0.27 on a conv digits student, and
# 99.66% top-1 agreement against 100%; tests/test_conv.py).
KEEP_FP32 = ("norm_sub", "norm", "bottleneck")


def _gathered(m: Any) -> dict[str, Any]:
    """Initializers read by a Gather (a token student's embedding table), by name: their Gather node."""
    return {n.input[0]: n for n in m.graph.node if n.op_type == "Gather"}


def _decode_rows(m: Any, table: str, stored: str, scale: str | None) -> None:
    """Replace each Gather of `table` (rows of a float table) by a Gather of the stored rows, cast to
    float32 and, with `scale` (one per row), multiplied by their scales: only the rows a batch uses are
    decoded, never the whole V x k table (at batch 1 that would cost more than the rest of the
    student)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    for n in m.graph.node:
        if n.op_type != "Gather" or n.input[0] != table:
            nodes.append(n)
            continue
        out, idx, p = n.output[0], n.input[1], n.output[0] + "/"
        cast = p + "float" if scale else out
        nodes += [helper.make_node("Gather", [stored, idx], [p + "stored"]),
                  helper.make_node("Cast", [p + "stored"], [cast], to=TensorProto.FLOAT)]
        if scale:
            m.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), p + "last_axis"))
            nodes += [helper.make_node("Gather", [scale, idx], [p + "scale"]),
                      helper.make_node("Unsqueeze", [p + "scale", p + "last_axis"], [p + "scale3"]),
                      helper.make_node("Mul", [p + "float", p + "scale3"], [out])]
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def to_fp16_weights(model: Any) -> Any:
    """Float32 initializers -> float16 ones plus a Cast back to float32 at the top of the graph (an
    embedding table: its gathered rows only)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    casts, inits = [], []
    gathered = _gathered(m)
    for init in m.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            inits.append(init)
            continue
        if init.name in gathered:
            inits.append(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                                 init.name + "_fp16"))
            _decode_rows(m, init.name, init.name + "_fp16", None)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16")
        inits.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))
    return _replace_weights(m, inits, casts)


def _replace_weights(m: Any, inits: list[Any], decoders: list[Any]) -> Any:
    """`m` with these initializers, and the nodes that turn them back into float32 weights first."""
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    nodes = decoders + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def to_int8_weights(model: Any) -> Any:
    """2-D float32 initializers -> int8 + per-channel scale + DequantizeLinear (symmetric, zero point 0).

    The first weight matrix the graph uses is scaled per input feature (axis 1 of the (out, in)
    Gemm weight), every other one per output unit (axis 0)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    gemm_weights = [n.input[1] for n in m.graph.node if n.op_type == "Gemm"]
    gathered = _gathered(m)
    # the first weights the input meets, unless a token student's embedding table comes first (its
    # input is a bag of rows, not standardized features)
    first = gemm_weights[0] if gemm_weights and not gathered else None
    deq, inits = [], []
    for init in m.graph.initializer:
        w = numpy_helper.to_array(init)
        if init.data_type != TensorProto.FLOAT or w.ndim != 2:
            inits.append(init)
            continue
        if init.name in gathered:  # per-row scales, rows decoded as gathered
            scale = np.abs(w).max(axis=1) / 127.0
            scale[scale == 0] = 1.0
            q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
            inits += [numpy_helper.from_array(q, init.name + "_int8"),
                      numpy_helper.from_array(scale.astype(np.float32), init.name + "_scale")]
            _decode_rows(m, init.name, init.name + "_int8", init.name + "_scale")
            continue
        axis = 1 if init.name == first else 0
        scale = np.abs(w).max(axis=1 - axis) / 127.0  # one per row (axis 0) or column (axis 1)
        scale[scale == 0] = 1.0
        q = np.clip(np.round(w / np.expand_dims(scale, 1 - axis)), -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(q, init.name + "_int8"),
                  numpy_helper.from_array(scale.astype(np.float32), init.name + "_scale")]
        deq.append(helper.make_node("DequantizeLinear", [init.name + "_int8", init.name + "_scale"],
                                    [init.name], axis=axis))
    return _replace_weights(m, inits, deq)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer calls `logging.warning` on the root logger ("consider pre-processing"),
    which would install a stderr handler: library code prints nothing, so hold it back."""
    root = logging.getLogger()
    guard, level = logging.NullHandler(), root.level
    root.addHandler(guard)  # basicConfig() adds no handler while one exists
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(guard)
        root.setLevel(level)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over an array of inputs, fed as `dtype` (the model
    input's own type: float16, uint8 pixels)."""

    def __init__(self, name: str, x: np.ndarray, dtype: np.dtype, batch: int = 64):
        self.batches: Iterator[dict[str, np.ndarray]] = (
            {name: np.ascontiguousarray(x[i : i + batch], dtype=dtype)} for i in range(0, x.shape[0], batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def convert(fp32_path: str, out_path: str, precision: str, method: str = "weights",
            calibration: np.ndarray | None = None) -> None:
    """Write `out_path` as the `precision` version of the fp32 ONNX file at `fp32_path`."""
    import onnx

    from compress.exporters.onnx import save

    if precision == "fp16":
        save(to_fp16_weights(onnx.load(fp32_path)), out_path)
        return
    if method == "weights":
        save(to_int8_weights(onnx.load(fp32_path)), out_path)
        return
    graph = onnx.load(fp32_path, load_external_data=False).graph
    keep_fp32 = [n.name for n in graph.node if n.name in KEEP_FP32]
    with _quiet_root_logger():
        _quantize(fp32_path, out_path, method, calibration, graph, keep_fp32)


def _quantize(fp32_path: str, out_path: str, method: str, calibration: np.ndarray | None, graph: Any,
              keep_fp32: list[str]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from compress.onnxfiles import external_files

    large = bool(external_files(fp32_path))  # weights beside the model in, weights beside it out
    if method == "dynamic":
        quantize_dynamic(fp32_path, out_path, per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_exclude=keep_fp32, use_external_data_format=large)
    elif method == "static":
        if calibration is None:
            raise ConfigError("--quantize static: needs calibration inputs (--data)")
        from onnx import helper

        dtype = helper.tensor_dtype_to_np_dtype(graph.input[0].type.tensor_type.elem_type)
        reader = _Calibration(graph.input[0].name, calibration[:_CALIBRATION_SAMPLES], dtype)
        quantize_static(fp32_path, out_path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=keep_fp32, use_external_data_format=large,
                        extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]})
    else:
        raise ConfigError(f"--quantize: must be weights, dynamic or static, got {method}")


def check_against_fp32(fp32_path: str, path: str, x: np.ndarray, precision: str,
                       min_agreement: float) -> tuple[float, float]:
    """Checker, then top-1 agreement and max abs difference with the fp32 model on x."""
    import onnx

    from compress.evaluate import run_onnx

    try:
        onnx.checker.check_model(path)
    except Exception as e:
        raise ExportError(f"{precision} export failed onnx.checker", [str(e).splitlines()[0]]) from None
    ref, got = run_onnx(fp32_path, x), run_onnx(path, x)
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    diff = float(np.abs(ref - got).max())
    if agreement < min_agreement:
        raise ExportError(f"--min-agreement: the {precision} export agrees with the fp32 student on "
                          f"{100 * agreement:.2f}% of {x.shape[0]} held-out inputs, below "
                          f"{100 * min_agreement:.2f}%; no file written (try --precision fp16, "
                          "or a lower --min-agreement if that is acceptable)")
    return agreement, diff


def refuse_too_large(cfg: Any, precision: str) -> None:
    """fp16/int8 conversions hold the whole model in one protobuf message: refuse a student whose
    fp32 weights are over `onnx.EXTERNAL_OVER` bytes (before training, not after)."""
    from compress.exporters.onnx import too_large
    from compress.student import count_params

    if precision != "fp32" and too_large(cfg):
        n = count_params(cfg)
        raise ConfigError(f"--precision {precision}: a student of {n:,} weights "
                          f"({4 * n / 1e9:.1f} GB in fp32) is too large for the fp16/int8 "
                          "conversions (protobuf's 2 GiB limit); only its fp32 export is written, "
                          "with the weights in a file beside it. Leave out --precision, or use a "
                          "smaller --width or --rank")


@contextlib.contextmanager
def fp32_file(proto: Any) -> Iterator[str]:
    """`proto` saved in a temporary folder: the fp32 file `export_precision` starts from, when there is
    none already (distill converts the student.onnx it has just written and checked)."""
    from compress.exporters.onnx import save

    with tempfile.TemporaryDirectory() as tmpdir:
        path = str(Path(tmpdir) / "fp32.onnx")
        save(proto, path)
        yield path


def export_precision(fp32_path: str | Path, out_path: str | Path, precision: str, check_x: np.ndarray,
                     min_agreement: float = MIN_AGREEMENT, method: str = "weights",
                     calibration: np.ndarray | None = None) -> dict[str, Any]:
    """Convert the fp32 ONNX file at `fp32_path`, check it against that file, and only then move it
    to `out_path`."""
    from compress.exporters.onnx import write_checked
    from compress.onnxfiles import onnx_size

    if not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"--min-agreement: must be between 0 and 1, got {min_agreement}")
    fp32 = str(fp32_path)
    agreement, diff = write_checked(
        lambda tmp: convert(fp32, str(tmp), precision, method, calibration), out_path,
        lambda tmp: check_against_fp32(fp32, tmp, check_x, precision, min_agreement))
    return {"precision": precision, "path": str(out_path), "size_bytes": onnx_size(out_path),
            "agreement_with_fp32": agreement, "max_abs_diff_vs_fp32": diff,
            "method": method if precision == "int8" else None}
