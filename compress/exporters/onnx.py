"""The student as ONNX: a drop-in for the teacher, validated before it is kept.

The graph is written directly with `onnx.helper` rather than traced with `torch.onnx.export`: the
student is four fixed operators (Flatten, Gemm, Relu, Gemm), so building it by hand gives exactly the
teacher's input name, shape and dtype, a dynamic batch axis and the teacher's output name, without
the tracer's cost on 100M-parameter models or its dependency on onnxscript.

Validation follows optimum's order: `onnx.checker`, then output names, then shapes, then values
against the torch student (`np.allclose(ort, torch, rtol=RTOL, atol=ATOL)`). A failure raises
`ExportError` listing every failing check, and the file is never moved to its final name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from compress.atomic import atomic_path
from compress.errors import ExportError
from compress.student import StudentConfig

if TYPE_CHECKING:
    import onnx
    import torch

    from compress.teachers import Signature

OPSET = 17  # Gemm without a bias input needs >= 11; 17 is read by every onnxruntime since 1.13
IR_VERSION = 8  # the IR of opset 17; newer IRs are refused by older runtimes
ATOL = 1e-4  # absolute tolerance of the value check (optimum uses 1e-5; timm 1e-4)
RTOL = 1e-3  # relative tolerance: wide layers sum many float32 terms (torch's ONNX verifier: 1e-3)
_PARITY_SAMPLES = 1024


@dataclass(frozen=True)
class ExportResult:
    path: str
    max_abs_diff: float  # onnxruntime vs the torch float32 student, on the check inputs
    max_abs_diff_fp64: float  # onnxruntime vs a float64 evaluation of the same weights
    size_bytes: int


def student_to_onnx(model: torch.nn.Module, cfg: StudentConfig, sig: Signature) -> onnx.ModelProto:
    """Build the ONNX graph from the student's weights, with the teacher's interface."""
    from onnx import TensorProto, helper, numpy_helper

    state = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    inits = [numpy_helper.from_array(np.ascontiguousarray(v), name=k) for k, v in state.items()]
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(sig.input_dtype))
    x = helper.make_tensor_value_info(sig.input_name, dtype, ["batch", *cfg.sample_shape])
    y = helper.make_tensor_value_info(sig.output_name, TensorProto.FLOAT, ["batch", cfg.num_classes])
    nodes = []
    src = sig.input_name
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [src], ["x_float"], to=TensorProto.FLOAT))
        src = "x_float"
    nodes.append(helper.make_node("Flatten", [src], ["flat"], axis=1))  # (N, D)
    if cfg.rank > 0:
        nodes.append(helper.make_node("Gemm", ["flat", "bottleneck.weight"], ["low_rank"],
                                      name="bottleneck", transB=1))  # (N, D) -> (N, k)
        nodes.append(helper.make_node("Gemm", ["low_rank", "hidden.weight", "hidden.bias"],
                                      ["pre_relu"], name="hidden", transB=1))  # (N, k) -> (N, H)
    else:
        nodes.append(helper.make_node("Gemm", ["flat", "hidden.weight", "hidden.bias"],
                                      ["pre_relu"], name="hidden", transB=1))  # (N, D) -> (N, H)
    nodes.append(helper.make_node("Relu", ["pre_relu"], ["hidden_out"], name="relu"))
    nodes.append(helper.make_node("Gemm", ["hidden_out", "out.weight", "out.bias"],
                                  [sig.output_name], name="out", transB=1))  # (N, H) -> (N, C)
    graph = helper.make_graph(nodes, "compress_student", [x], [y], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                          producer_name="compress")
    m.ir_version = IR_VERSION
    m.doc_string = (f"SNN-MIMIC student: width {cfg.width}, rank {cfg.rank}, "
                    f"{cfg.input_dim} inputs, {cfg.num_classes} outputs")
    return m


def _check(path: str, model: torch.nn.Module, sig: Signature, x: np.ndarray) -> tuple[float, float]:
    """Checker, names, shapes, values. Returns (max |ort - torch|, max |ort - float64|)."""
    import copy

    import onnx
    import onnxruntime as ort
    import torch

    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:
        raise ExportError("exported ONNX failed onnx.checker", [str(e).splitlines()[0]]) from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    failures = []
    names = [o.name for o in sess.get_outputs()]
    if names != [sig.output_name]:
        failures.append(f"outputs are {names}, expected ['{sig.output_name}']")
    if [i.name for i in sess.get_inputs()] != [sig.input_name]:
        failures.append(f"input is not named '{sig.input_name}'")
    if failures:
        raise ExportError("exported ONNX has the wrong interface", failures)
    (got,) = sess.run(None, {sig.input_name: x.astype(sig.input_dtype)})
    with torch.no_grad():
        ref = model(torch.from_numpy(x.astype(np.float32))).numpy()
        ref64 = copy.deepcopy(model).double()(torch.from_numpy(x.astype(np.float64))).numpy()
    if got.shape != ref.shape:
        raise ExportError("exported ONNX gives the wrong shape",
                          [f"'{sig.output_name}': {got.shape} vs torch {ref.shape}"])
    diff = float(np.abs(got - ref).max())
    if not np.allclose(got, ref, rtol=RTOL, atol=ATOL):
        raise ExportError("exported ONNX disagrees with the torch student",
                          [f"'{sig.output_name}': max abs diff {diff:.3g} (rtol {RTOL}, atol {ATOL})"])
    return diff, float(np.abs(got.astype(np.float64) - ref64).max())


def export_onnx(model: torch.nn.Module, cfg: StudentConfig, sig: Signature, path: str | Path,
                check_inputs: np.ndarray) -> ExportResult:
    """Write `path` only if the export passes every check on (up to 1024 of) `check_inputs`."""
    import onnx

    proto = student_to_onnx(model, cfg, sig)
    x = np.asarray(check_inputs[:_PARITY_SAMPLES]).reshape(-1, *cfg.sample_shape)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)
        diff, diff64 = _check(tmp, model, sig, x)
    return ExportResult(path=str(path), max_abs_diff=diff, max_abs_diff_fp64=diff64,
                        size_bytes=Path(path).stat().st_size)
