"""The student as ONNX: a drop-in for the teacher, validated before it is kept.

The graph is written directly with `onnx.helper` rather than traced with `torch.onnx.export`: the
student is four fixed operators (Flatten, Gemm, Relu, Gemm), so building it by hand gives exactly the
teacher's input name, shape and dtype, a dynamic batch axis and the teacher's output name, without
the tracer's cost on 100M-parameter models or its dependency on onnxscript.

A student whose weights pass EXTERNAL_OVER bytes (protobuf cannot hold a message over 2 GiB; a
400k-wide student without a bottleneck is 3.2 GB) has them written to one file beside the model,
`<name>.<token>.data`, which the model names; onnxruntime reads it from the model's folder, so the two
files travel together. The token is new for every export, so replacing a model never leaves it
pointing at another export's weights.

Validation follows optimum's order: `onnx.checker`, then output names, then shapes, then values
against the torch student (`np.allclose(ort, torch, rtol=RTOL, atol=ATOL)`). A failure raises
`ExportError` listing every failing check, and the file is never moved to its final name.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from compress.atomic import writing
from compress.errors import ExportError
from compress.onnxfiles import external_files, onnx_size
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
PARITY_ELEMENTS = 2**24  # activations per layer per parity chunk (samples x the widest layer)
EXTERNAL_OVER = 1_800_000_000  # model bytes above which the weights are written beside it
T = TypeVar("T")


@dataclass(frozen=True)
class ExportResult:
    path: str
    max_abs_diff: float  # onnxruntime vs the torch float32 student, on the check inputs
    max_abs_diff_fp64: float  # onnxruntime vs a float64 evaluation of the same weights
    size_bytes: int


def student_to_onnx(model: torch.nn.Module, cfg: StudentConfig, sig: Signature,
                    weights_file: Path | None = None) -> onnx.ModelProto:
    """Build the ONNX graph from the student's weights, with the teacher's interface. With
    `weights_file`, the weights are written there (each at a page-aligned offset) and the graph only
    names them: protobuf cannot hold a tensor over 2 GiB, so a large student is never in one message."""
    from onnx import numpy_helper

    p = internal_prefix(sig)
    state = {p + k: np.ascontiguousarray(v.detach().cpu().float().numpy())
             for k, v in model.state_dict().items()}
    if weights_file is None:
        inits = [numpy_helper.from_array(v, name=k) for k, v in state.items()]
    else:
        with open(weights_file, "wb") as f:
            inits = [_external_tensor(k, v, f, weights_file.name) for k, v in state.items()]
    return _graph(inits, cfg, sig)


def _external_tensor(name: str, value: np.ndarray, f: Any, location: str) -> onnx.TensorProto:
    from onnx import TensorProto

    f.write(b"\0" * (-f.tell() % 4096))  # page-aligned, so that a runtime may map it
    offset = f.tell()
    f.write(memoryview(value.astype("<f4", copy=False)).cast("B"))
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=value.shape,
                    data_location=TensorProto.EXTERNAL)
    for key, v in (("location", location), ("offset", offset), ("length", value.nbytes)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(v)
    return t


def internal_prefix(sig: Signature) -> str:
    """The prefix of every name inside the student's graph (weights, intermediate values): `student/`,
    lengthened while the teacher's input or output name starts with it, so that no interface name of
    any teacher can collide with an internal one (ONNX requires each value to be defined once)."""
    p = "student/"
    while any(n.startswith(p) for n in (sig.input_name, *sig.inputs, sig.output_name)):
        p = p[:-1] + "_/"
    return p


def _graph(inits: list[onnx.TensorProto], cfg: StudentConfig, sig: Signature) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    p = internal_prefix(sig)

    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(sig.input_dtype))
    # the teacher's output shape: (N, C), or (N, C, 1, 1) and the like (Signature.output_shape)
    per = [cfg.num_classes if d == -1 else d for d in (sig.output_shape or (-1,))]
    y = helper.make_tensor_value_info(sig.output_name, TensorProto.FLOAT, ["batch", *per])
    nodes, extra = [], []
    if cfg.vocab:  # the teacher's token inputs, each [batch, sequence], any of them unused
        xs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(t)),
                                            ["batch", "sequence"])
              for n, t in zip(sig.inputs, sig.input_dtypes, strict=True)]
    else:
        xs = [helper.make_tensor_value_info(sig.input_name, dtype, ["batch", *cfg.sample_shape])]
    src = sig.input_name
    if dtype != TensorProto.FLOAT and not cfg.vocab:
        nodes.append(helper.make_node("Cast", [src], [p + "x_float"], to=TensorProto.FLOAT))
        src = p + "x_float"
    for layer in cfg.layers():  # the one layer list (compress/student.py), input to output
        name, v = layer.name, p + layer.name
        if layer.kind == "embed":
            _embedding_bag(nodes, extra, cfg, sig, v)
        elif layer.kind == "norm":  # (x - mean) * scale, exact at the convolutions' padded borders
            nodes.append(helper.make_node("Sub", [src, v + ".mean"], [v + "_centred"], name="norm_sub"))
            nodes.append(helper.make_node("Mul", [v + "_centred", v + ".scale"], [v + "_out"], name="norm"))
        elif layer.kind == "transpose":  # (N, *S, C) -> (N, C, *S): channels first, as Conv takes them
            last = len(layer.in_shape)
            nodes.append(helper.make_node("Transpose", [src], [v + "_out"], name=name,
                                          perm=[0, last, *range(1, last)]))
        elif layer.kind == "unsqueeze":  # (N, L) -> (N, 1, L): one channel
            extra.append(helper.make_tensor(v + ".axes", TensorProto.INT64, [1], [1]))
            nodes.append(helper.make_node("Unsqueeze", [src, v + ".axes"], [v + "_out"], name=name))
        elif layer.kind == "conv":
            dims = len(layer.in_shape) - 1
            nodes.append(helper.make_node("Conv", [src, v + ".weight", v + ".bias"], [v + "_conv"],
                                          name=name, kernel_shape=[layer.kernel] * dims,
                                          pads=[layer.kernel // 2] * 2 * dims, strides=[1] * dims))
            nodes.append(helper.make_node("Relu", [v + "_conv"], [v + "_out"], name=name + "_relu"))
        elif layer.kind == "pool":
            dims = len(layer.in_shape) - 1
            nodes.append(helper.make_node("MaxPool", [src], [v + "_out"], name=name,
                                          kernel_shape=[layer.size] * dims, strides=[layer.size] * dims))
        elif layer.kind == "flatten":
            nodes.append(helper.make_node("Flatten", [src], [v + "_out"], axis=1))  # (N, D)
        elif layer.kind == "bottleneck":
            nodes.append(helper.make_node("Gemm", [src, v + ".weight"], [v + "_out"], name=name,
                                          transB=1))  # (N, D) -> (N, k)
        elif layer.kind == "hidden":
            nodes.append(helper.make_node("Gemm", [src, v + ".weight", v + ".bias"], [v + "_pre"], name=name,
                                          transB=1))  # (N, k or D) -> (N, H)
            nodes.append(helper.make_node("Relu", [v + "_pre"], [v + "_out"], name="relu"))
        else:
            scores = sig.output_name if len(per) == 1 else v + "_scores"
            nodes.append(helper.make_node("Gemm", [src, v + ".weight", v + ".bias"], [scores],
                                          name=name, transB=1))  # (N, H) -> (N, C)
            if len(per) > 1:  # (N, C) -> the teacher's (N, C, 1, 1) or the like
                extra.append(helper.make_tensor(v + ".shape", TensorProto.INT64, [len(per) + 1], [-1, *per]))
                nodes.append(helper.make_node("Reshape", [scores, v + ".shape"], [sig.output_name],
                                              name=name + "_shape"))
        src = v + "_out"
    graph = helper.make_graph(nodes, "compress_student", xs, [y], initializer=[*inits, *extra])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                          producer_name="compress")
    m.ir_version = IR_VERSION
    m.doc_string = (f"SNN-MIMIC student {cfg.spec}: width {cfg.width}, rank {cfg.rank}, "
                    f"{cfg.input_dim} inputs, {cfg.num_classes} outputs")
    return m


def _embedding_bag(nodes: list[Any], extra: list[Any], cfg: StudentConfig, sig: Signature, v: str) -> None:
    """(N, k) = the mean of the ids' rows of `v.weight` (V x k) over the tokens the attention mask keeps;
    an id outside 0..V-1 counts as a token with a zero row. Integer constants only (no parameters)."""
    from onnx import TensorProto, helper

    from compress.student import NGRAM_PRIME
    from compress.tokens import roles

    r = roles(sig.inputs)

    def const(name: str, values: list[int], dims: list[int]) -> str:
        extra.append(helper.make_tensor(v + name, TensorProto.INT64, dims, values))
        return v + name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [v + out], **attrs))
        return v + out

    zero, one, top = const(".zero", [0], []), const(".one", [1], []), const(".last_id", [cfg.vocab - 1], [])
    ids = node("Cast", [sig.inputs[r.ids]], "_ids", to=TensorProto.INT64)
    if r.mask is not None:
        keep = node("Greater", [node("Cast", [sig.inputs[r.mask]], "_mask", to=TensorProto.INT64), zero],
                    "_keep")
    else:
        keep = node("GreaterOrEqual", [ids, zero], "_keep")  # every token
    known = node("And", [keep, node("LessOrEqual", [ids, top], "_in_vocab")], "_known")
    rows = node("Gather", [v + ".weight", node("Min", [node("Max", [ids, zero], "_nonneg"), top], "_row")],
                "_rows")  # (N, L, k)
    axis1, axis2 = const(".axis1", [1], [1]), const(".axis2", [2], [1])

    def bag(rows: str, use: str, tag: str) -> str:
        """The sum of `rows` (N, L', k) over the positions where `use` (N, L') holds."""
        weights = node("Unsqueeze", [node("Cast", [use], tag + "_w", to=TensorProto.FLOAT), axis2],
                       tag + "_w3")
        return node("ReduceSum", [node("Mul", [rows, weights], tag + "_weighted"), axis1], tag + "_sum",
                    keepdims=0)

    total = bag(rows, known, "")
    count = node("ReduceSum", [node("Cast", [keep], "_k64", to=TensorProto.INT64), axis1], "_count64",
                 keepdims=1)
    row = v + "_row"
    if cfg.ngrams > 1:
        prime, buckets = const(".prime", [NGRAM_PRIME], []), const(".buckets", [cfg.buckets], [])
    for n in range(2, cfg.ngrams + 1):  # hashed n-grams of the kept tokens (NGRAM_PRIME, student.py)
        g = f"_{n}gram"
        h = kept = whole = None
        for j in range(n):
            start, end = const(f"{g}.start{j}", [j], [1]), const(f"{g}.end{j}", [j - n + 1 or 2**62], [1])
            part = [node("Slice", [t, start, end, axis1], f"{g}{j}_{tag}") for t, tag in
                    ((row, "row"), (keep, "keep"), (known, "known"))]
            h = part[0] if h is None else node("Add", [node("Mul", [h, prime], f"{g}{j}_times"), part[0]],
                                              f"{g}{j}_plus")
            h = node("Mod", [h, buckets], f"{g}{j}_hash")
            kept = part[1] if kept is None else node("And", [kept, part[1]], f"{g}{j}_kept")
            whole = part[2] if whole is None else node("And", [whole, part[2]], f"{g}{j}_whole")
        grams = bag(node("Gather", [v + ".ngram", h], g + "_rows"), whole, g)
        total = node("Add", [total, grams], g + "_total")
        count = node("Add", [count, node("ReduceSum", [node("Cast", [kept], g + "_k64", to=TensorProto.INT64),
                                                       axis1], g + "_kept64", keepdims=1)], g + "_count")
    count = node("Max", [count, one], "_count1")
    node("Div", [total, node("Cast", [count], "_count", to=TensorProto.FLOAT)], "_out")


def _check(path: str, model: torch.nn.Module, sig: Signature, x: np.ndarray,
           cfg: StudentConfig | None = None) -> tuple[float, float]:
    """Checker, names, shapes, values. Returns (max |ort - torch|, max |ort - float64|)."""
    import onnx
    import onnxruntime as ort
    import torch

    from compress.teachers.onnx_teacher import session_options

    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:
        raise ExportError("exported ONNX failed onnx.checker", [str(e).splitlines()[0]]) from None
    sess = ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])
    failures = []
    names = [o.name for o in sess.get_outputs()]
    if names != [sig.output_name]:
        failures.append(f"outputs are {names}, expected ['{sig.output_name}']")
    want = list(sig.inputs) if sig.tokens else [sig.input_name]
    if [i.name for i in sess.get_inputs()] != want:
        failures.append(f"inputs are {[i.name for i in sess.get_inputs()]}, expected {want}")
    if failures:
        raise ExportError("exported ONNX has the wrong interface", failures)
    from compress.tokens import feeds

    # a few samples at a time: at the paper's width one sample's float64 activations are 3.2 MB, and
    # 1,024 at once took 6.6 GB (the largest memory of the whole distill)
    widest = max(math.prod(layer.out_shape) for layer in cfg.layers()) if cfg is not None else 1
    step = max(1, PARITY_ELEMENTS // widest)
    parts = []
    for i in range(0, len(x), step):
        xi = x[i : i + step]
        if sig.tokens:
            (g,) = sess.run(None, feeds(sig.inputs, sig.input_dtypes, xi))
            xt, xt64 = torch.from_numpy(xi.astype(np.int64)), torch.from_numpy(xi.astype(np.int64))
        else:
            (g,) = sess.run(None, {sig.input_name: xi.astype(sig.input_dtype)})
            xt, xt64 = torch.from_numpy(xi.astype(np.float32)), torch.from_numpy(xi.astype(np.float64))
        with torch.no_grad():
            parts.append((g, model(xt).numpy(), _forward64(model, xt64).numpy()))
    got, ref, ref64 = (np.concatenate(a) for a in zip(*parts, strict=True))
    if sig.output_shape:  # the teacher's (N, C, 1, 1) or the like, compared as (N, C)
        want = tuple(ref.shape[1] if d == -1 else d for d in sig.output_shape)
        if got.shape[1:] != want:
            raise ExportError("exported ONNX gives the wrong shape",
                              [f"'{sig.output_name}': {got.shape[1:]} a sample vs the teacher's {want}"])
        got = got.reshape(len(got), -1)
    if got.shape != ref.shape:
        raise ExportError("exported ONNX gives the wrong shape",
                          [f"'{sig.output_name}': {got.shape} vs torch {ref.shape}"])
    diff = float(np.abs(got - ref).max())
    if not np.allclose(got, ref, rtol=RTOL, atol=ATOL):
        raise ExportError("exported ONNX disagrees with the torch student",
                          [f"'{sig.output_name}': max abs diff {diff:.3g} (rtol {RTOL}, atol {ATOL})"])
    return diff, float(np.abs(got.astype(np.float64) - ref64).max())


def _forward64(model: torch.nn.Module, x: torch.Tensor, rows: int = 65_536) -> torch.Tensor:
    """The student in float64, a block of each layer's weight rows at a time: a float64 copy of a
    3 GB student's weights at once would take 6 GB."""
    import copy

    import torch
    from torch import nn

    for layer in model:
        if isinstance(layer, nn.Flatten):
            x = layer(x)
        elif isinstance(layer, nn.ReLU):
            x = x.clamp_min(0)
        elif not isinstance(layer, nn.Linear):  # norm, conv, pool: small; a float64 copy of each
            x = copy.deepcopy(layer).double()(x)
        elif isinstance(layer, nn.Linear):
            w = layer.weight.detach()
            b = torch.zeros(w.shape[0]) if layer.bias is None else layer.bias.detach()
            out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)  # filled a block at a time
            for i in range(0, w.shape[0], rows):
                out[:, i : i + rows] = x @ w[i : i + rows].double().T + b[i : i + rows].double()
            x = out
    return x


def export_onnx(model: torch.nn.Module, cfg: StudentConfig, sig: Signature, path: str | Path,
                check_inputs: np.ndarray, external_over: int = EXTERNAL_OVER) -> ExportResult:
    """Write `path` only if the export passes every check on (up to 1024 of) `check_inputs`."""
    import onnx

    x = np.asarray(check_inputs[:_PARITY_SAMPLES]).reshape(-1, *cfg.sample_shape)

    def write(tmp: Path) -> None:
        if too_large(cfg, external_over):
            onnx.save_model(student_to_onnx(model, cfg, sig, _data_name(tmp)), str(tmp))
        else:
            save(student_to_onnx(model, cfg, sig), tmp, external_over)

    diff, diff64 = write_checked(write, path, lambda tmp: _check(tmp, model, sig, x, cfg))
    return ExportResult(path=str(path), max_abs_diff=diff, max_abs_diff_fp64=diff64,
                        size_bytes=onnx_size(path))


def too_large(cfg: StudentConfig, external_over: int = EXTERNAL_OVER) -> bool:
    """Whether the student's float32 weights are too many for one ONNX file."""
    from compress.student import count_params

    return 4 * count_params(cfg) > external_over


def _data_name(path: Path) -> Path:
    return path.parent / f"{path.name}.{uuid.uuid4().hex[:8]}.data"


def save(proto: onnx.ModelProto, path: str | Path, external_over: int = EXTERNAL_OVER) -> None:
    """onnx.save_model, with the weights in a file beside `path` when the model passes `external_over`
    bytes."""
    import onnx

    path = Path(path)
    if proto.ByteSize() <= external_over:  # the serialized size, weights however stored
        onnx.save_model(proto, str(path))
        return
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=_data_name(path).name, size_threshold=0)


def write_checked(write: Callable[[Path], None], path: str | Path, check: Callable[[str], T]) -> T:
    """`write` the model to a temporary folder beside `path`, run `check` on it there, and only if
    it passes move it to `path` (its weight files first, the model last); weight files of the model
    that was at `path` before, and not reused by name, are removed after. Returns `check`'s result."""
    path = Path(path)
    tmpdir = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with writing(path):  # a full disk or a forbidden folder: one line naming `path`
            path.parent.mkdir(parents=True, exist_ok=True)
            tmpdir.mkdir(exist_ok=True)
            tmp = tmpdir / path.name
            write(tmp)
        result = check(str(tmp))
        old, new = external_files(path), external_files(tmp)
        for f in new:
            os.replace(f, path.parent / f.name)
        os.replace(tmp, path)
        for f in old:
            if f.name not in {n.name for n in new}:
                f.unlink(missing_ok=True)
        return result
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
