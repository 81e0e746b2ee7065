"""ONNX teachers, run by onnxruntime (the CUDA provider only when a GPU is really there).

One input of measurements: floats, or the integers of raw pixels and samples (uint8, int8, uint16,
int16: `INTEGER_TYPES`), which the student takes as they are and casts to float in its first node; wider
integers are token ids (compress.tokens) or categories, which a student cannot take as quantities. The
output is the first float tensor output (or `output`); a model with no float
tensor output but a ZipMap (scikit-learn via skl2onnx: a sequence of {class: probability} maps) uses
that. Label outputs (integer tensors) are ignored. A batch size baked into the model is honoured by
running chunks of exactly that size, the last one padded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import TeacherError
from compress.onnxfiles import onnx_size
from compress.teachers import (
    Progress,
    Signature,
    check_model_file,
    gpu_available,
    looks_like_probabilities,
    probabilities_to_logits,
    run_batched,
    scores,
    squeezable,
)
from compress.tokens import feeds, names_and_dtypes, roles, token_teacher

FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
# integer inputs that hold quantities (an image's pixels, an audio clip's samples), read as numbers
INTEGER_TYPES = {"tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(uint16)": np.uint16,
                 "tensor(int16)": np.int16}
INPUT_TYPES = {**FLOAT_TYPES, **INTEGER_TYPES}
PROBABILITY_OPS = {"Softmax", "Normalizer", "ZipMap"}  # graph nodes whose output is probabilities


def ort_providers(device: str = "auto") -> list[str]:
    import onnxruntime as ort

    want_cuda = device == "cuda" or (device == "auto" and gpu_available())
    if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int | None = None) -> Any:
    """onnxruntime session options: errors only in its log; `threads` intra-op threads, or when
    none are asked for, the process's CPU budget where a container's quota caps it (compress.threads:
    onnxruntime, like torch, would size its pool to the host's cores)."""
    import onnxruntime as ort

    from compress.threads import quota_cap

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    threads = threads or quota_cap()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def onnx_param_count(model: Any) -> int:
    """Floating-point values the model stores: initializers, float tensors in Constant nodes, and
    float-list attributes (scikit-learn converters keep coefficients and tree thresholds there).
    Integer tensors are shapes and indices, scalar attributes hyperparameters: neither counts."""
    from onnx import AttributeProto, TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    if isinstance(model, (str, Path)):
        import onnx

        model = onnx.load(str(model), load_external_data=False)
    total = sum(math.prod(i.dims) for i in model.graph.initializer if i.data_type in floats)
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == AttributeProto.FLOATS:
                total += len(a.floats)
            elif a.type == AttributeProto.TENSOR and a.t.data_type in floats:
                total += math.prod(a.t.dims)
    return total


def output_kind_guess(model: Any, name: str, ort_type: str) -> str:
    """'labels', 'probabilities' or 'logits', from the output's type and the node producing it."""
    if ort_type.startswith("seq(map"):
        return "probabilities"
    if ort_type not in FLOAT_TYPES:
        return "labels"
    producer = next((n.op_type for n in model.graph.node if name in n.output), None)
    return "probabilities" if producer in PROBABILITY_OPS else "logits"


def pick_output(outputs: list[Any], output: str | None, path: Path) -> Any:
    """The output distill uses: `output`, else the first float tensor, else the first ZipMap."""
    usable = [o for o in outputs if o.type in FLOAT_TYPES or o.type.startswith("seq(map")]
    if output is not None:
        chosen = [o for o in outputs if o.name == output]
        if not chosen:
            raise TeacherError(f"--output: the teacher {path} has no output '{output}' "
                               f"(outputs: {[o.name for o in outputs]})")
        if chosen[0] not in usable:
            raise TeacherError(f"--output: output '{output}' of {path} is {chosen[0].type}, not "
                               "float scores (logits or probabilities)")
        return chosen[0]
    floats = [o for o in usable if o.type in FLOAT_TYPES]
    if floats or usable:
        return (floats or usable)[0]
    raise TeacherError(f"TEACHER {path}: no output holds float scores (outputs: "
                       f"{[(o.name, o.type) for o in outputs]}); compress needs logits or probabilities")


class OnnxTeacher:
    def __init__(self, path: str | Path, output: str | None = None, device: str = "auto"):
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        self.name = self.path.name
        self.size_bytes = check_model_file(self.path)
        try:
            self.model = onnx.load(str(self.path), load_external_data=False)
        except Exception as e:  # onnx raises DecodeError, ValueError, ... for a corrupt file
            raise TeacherError(f"TEACHER {self.path}: not a valid ONNX model ({type(e).__name__})") from None
        self.params: int | None = onnx_param_count(self.model)
        self.size_bytes = onnx_size(self.path, self.model)  # with the weight files it names
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(),
                                                providers=ort_providers(device))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TeacherError(f"TEACHER {self.path}: onnxruntime cannot load it ({first})") from None
        self.signature = self._signature(output)
        out = next(o for o in self.session.get_outputs() if o.name == self.signature.output_name)
        self._zipmap = out.type.startswith("seq(map")
        guess = output_kind_guess(self.model, out.name, out.type)
        self.output_kind = "probabilities" if guess == "probabilities" else "unknown"  # decided on data

    def _signature(self, output: str | None) -> Signature:
        inputs = self.session.get_inputs()
        if token_teacher(inputs):
            return self._token_signature(inputs, output)
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            raise TeacherError(f"TEACHER {self.path}: has {len(inputs)} inputs {names}; compress needs "
                               "one float input (export the model with the other inputs fixed)")
        inp = inputs[0]
        if inp.type not in INPUT_TYPES:
            raise TeacherError(f"TEACHER {self.path}: input '{inp.name}' is {inp.type}; compress needs "
                               "floats or small integers (uint8/int8/uint16/int16: pixels, samples) there; "
                               "token ids or categories need their embedding in the student")
        dims = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
        if not dims:
            raise TeacherError(f"TEACHER {self.path}: input '{inp.name}' is a scalar; expected a batch")
        out = pick_output(self.session.get_outputs(), output, self.path)
        per = [d if isinstance(d, int) and d > 0 else None for d in (out.shape or [])[1:]]
        shape = tuple(-1 if d is None or d > 1 else 1 for d in per) if squeezable(tuple(per)) else None
        return Signature(input_name=inp.name, sample_shape=tuple(dims[1:]),
                         input_dtype=np.dtype(INPUT_TYPES[inp.type]).name, output_name=out.name,
                         batch=dims[0], output_shape=shape)

    def _token_signature(self, inputs: list[Any], output: str | None) -> Signature:
        """Integer inputs [batch, sequence] (compress.tokens); the output must be per-example scores."""
        names, dtypes = names_and_dtypes(inputs)
        r = roles(names, f"TEACHER {self.path}")
        out = pick_output(self.session.get_outputs(), output, self.path)
        if len(out.shape) != 2:
            shape = ", ".join(str(d) for d in out.shape)
            raise TeacherError(f"TEACHER {self.path}: output '{out.name}' is [{shape}], not per-example "
                               "class scores [batch, classes] (an encoder needs its pooling and classifier "
                               "head in the model)")
        first = inputs[0].shape[0]
        return Signature(input_name=names[r.ids], sample_shape=(len(names), None),
                         input_dtype="int64", output_name=out.name,
                         batch=first if isinstance(first, int) and first > 0 else None, inputs=names,
                         input_dtypes=dtypes)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        sig = self.signature
        if sig.tokens:
            feed = feeds(sig.inputs, sig.input_dtypes, batch)
        else:
            feed = {sig.input_name: batch.astype(sig.input_dtype, copy=False)}
        try:
            (y,) = self.session.run([sig.output_name], feed)
        except Exception as e:
            first = str(e).strip().splitlines()[0]
            raise TeacherError(f"TEACHER {self.path}: failed on a batch of shape "
                               f"{batch.shape} ({first})") from None
        if self._zipmap:  # [{class: p, ...}, ...] -> (N, C), classes in sorted order
            keys = sorted(y[0])
            y = np.array([[row[k] for k in keys] for row in y], dtype=np.float32)
        y2 = scores(np.asarray(y, dtype=np.float32), batch.shape[0])
        if y2 is None:
            raise TeacherError(f"TEACHER {self.path}: output '{sig.output_name}' has shape "
                               f"{np.shape(y)} for {batch.shape[0]} samples; expected (N, classes), or "
                               "(N, classes, 1, 1) and the like")
        y = y2
        if self.output_kind == "unknown":  # decided once, on the first batch the teacher sees
            self.output_kind = "probabilities" if looks_like_probabilities(y) else "logits"
        return probabilities_to_logits(y) if self.output_kind == "probabilities" else y

    def logits(self, x: np.ndarray, batch_size: int = 1024, progress: Progress | None = None
               ) -> np.ndarray:
        """Float32 logits (N, C) for inputs x (N, *sample_shape)."""
        return run_batched(self._run, x, batch_size, self.signature.batch, progress)
