"""Teachers: trained models that hand back logits, run in batches.

A teacher is anything with the `Teacher` protocol. `OnnxTeacher` runs an ONNX file with onnxruntime
(the CUDA provider only when a GPU is really present); `EnsembleTeacher` averages the logits of
several teachers, as the paper's strongest teachers were ensembles (Ba & Caruana 2014, section 2.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from compress.errors import TeacherError

Progress = Callable[[int, int], None]  # (samples done, samples in all)

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class Signature:
    """The teacher's input, as the student's ONNX export must copy it."""

    input_name: str
    sample_shape: tuple[int | None, ...]  # one sample, without the batch axis; None = dynamic
    input_dtype: str  # numpy dtype name, e.g. "float32"
    output_name: str
    batch: int | None  # a batch size baked into the model, or None when the batch axis is dynamic


class Teacher(Protocol):
    name: str
    signature: Signature
    params: int | None
    size_bytes: int

    def logits(self, x: np.ndarray, batch_size: int = 1024, progress: Progress | None = None
               ) -> np.ndarray: ...


def gpu_available() -> bool:
    """True when torch sees a CUDA device (onnxruntime-gpu lists CUDA even on machines without one)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def ort_providers(device: str = "auto") -> list[str]:
    import onnxruntime as ort

    want_cuda = device == "cuda" or (device == "auto" and gpu_available())
    if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_param_count(path: Path) -> int:
    """Number of values in the model's floating-point initializers (its weights; integer ones are
    shapes and indices), read without loading external data."""
    import onnx
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    model = onnx.load(str(path), load_external_data=False)
    return sum(math.prod(i.dims) for i in model.graph.initializer if i.data_type in floats)


def run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int,
                fixed_batch: int | None = None, progress: Progress | None = None) -> np.ndarray:
    """Apply `fn` to `x` in batches and stack the results. With a fixed batch size, the last batch
    is padded with copies of its last sample and the padding's outputs dropped."""
    n = x.shape[0]
    step = fixed_batch or batch_size
    out: np.ndarray | None = None
    for start in range(0, n, step):
        chunk = np.asarray(x[start : start + step])
        m = chunk.shape[0]
        if fixed_batch and m < fixed_batch:
            pad = np.repeat(chunk[-1:], fixed_batch - m, axis=0)
            chunk = np.concatenate([chunk, pad])
        y = fn(chunk)[:m]
        if out is None:
            out = np.empty((n, *y.shape[1:]), dtype=np.float32)
        out[start : start + m] = y
        if progress:
            progress(start + m, n)
    assert out is not None  # x is never empty: the data loaders refuse empty files
    return out


class OnnxTeacher:
    """An ONNX classifier with one float input; its logits are the first float output (or `output`)."""

    def __init__(self, path: str | Path, output: str | None = None, device: str = "auto"):
        import onnxruntime as ort

        self.path = Path(path)
        self.name = self.path.name
        if not self.path.exists():
            raise TeacherError(f"TEACHER {self.path}: file not found")
        if self.path.is_dir():
            raise TeacherError(f"TEACHER {self.path}: is a folder, not a model file")
        try:
            self.size_bytes = self.path.stat().st_size
            with open(self.path, "rb"):
                pass
        except OSError as e:
            raise TeacherError(f"TEACHER {self.path}: cannot be read ({e.strerror or e})") from None
        try:
            self.params: int | None = onnx_param_count(self.path)
        except Exception as e:  # onnx raises DecodeError, ValueError, ... for a corrupt file
            raise TeacherError(f"TEACHER {self.path}: not a valid ONNX model ({type(e).__name__})") from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=ort_providers(device))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TeacherError(f"TEACHER {self.path}: onnxruntime cannot load it ({first})") from None
        self.signature = self._signature(output)

    def _signature(self, output: str | None) -> Signature:
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            raise TeacherError(f"TEACHER {self.path}: has {len(inputs)} inputs {names}; "
                               "compress needs a model with one float input")
        inp = inputs[0]
        if inp.type not in _ORT_FLOAT:
            raise TeacherError(f"TEACHER {self.path}: input '{inp.name}' is {inp.type}; "
                               "compress needs a float input")
        dims = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
        if not dims:
            raise TeacherError(f"TEACHER {self.path}: input '{inp.name}' is a scalar; expected a batch")
        floats = [o for o in self.session.get_outputs() if o.type in _ORT_FLOAT]
        if output is not None:
            chosen = [o for o in self.session.get_outputs() if o.name == output]
            if not chosen:
                names = [o.name for o in self.session.get_outputs()]
                raise TeacherError(f"--output: the teacher {self.path} has no output '{output}' "
                                   f"(outputs: {names})")
            if chosen[0].type not in _ORT_FLOAT:
                raise TeacherError(f"--output: output '{output}' of {self.path} is "
                                   f"{chosen[0].type}, not a float tensor")
            out = chosen[0]
        elif floats:
            out = floats[0]
        else:
            raise TeacherError(f"TEACHER {self.path}: no float tensor output to use as logits")
        return Signature(
            input_name=inp.name,
            sample_shape=tuple(dims[1:]),
            input_dtype=np.dtype(_ORT_FLOAT[inp.type]).name,
            output_name=out.name,
            batch=dims[0],
        )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        sig = self.signature
        feed = {sig.input_name: batch.astype(sig.input_dtype, copy=False)}
        try:
            (y,) = self.session.run([sig.output_name], feed)
        except Exception as e:
            first = str(e).strip().splitlines()[0]
            raise TeacherError(f"TEACHER {self.path}: failed on a batch of shape "
                               f"{batch.shape} ({first})") from None
        y = np.asarray(y, dtype=np.float32)
        if y.ndim != 2 or y.shape[0] != batch.shape[0]:
            raise TeacherError(f"TEACHER {self.path}: output '{sig.output_name}' has shape "
                               f"{y.shape} for {batch.shape[0]} samples; expected (N, classes)")
        return y

    def logits(self, x: np.ndarray, batch_size: int = 1024, progress: Progress | None = None
               ) -> np.ndarray:
        """Float32 logits (N, C) for inputs x (N, *sample_shape)."""
        return run_batched(self._run, x, batch_size, self.signature.batch, progress)


class EnsembleTeacher:
    """The mean of its members' logits. Members must agree on input shape and class count."""

    def __init__(self, members: list[Teacher]):
        first = members[0]
        for m in members[1:]:
            if m.signature.sample_shape != first.signature.sample_shape:
                raise TeacherError(f"TEACHER {m.name}: input shape {m.signature.sample_shape} differs "
                                   f"from {first.name}'s {first.signature.sample_shape}")
        self.members = members
        self.name = " + ".join(m.name for m in members)
        self.signature = first.signature
        counts = [m.params for m in members]
        self.params = None if any(c is None for c in counts) else sum(counts)  # type: ignore[arg-type]
        self.size_bytes = sum(m.size_bytes for m in members)

    def logits(self, x: np.ndarray, batch_size: int = 1024, progress: Progress | None = None
               ) -> np.ndarray:
        n, k = x.shape[0], len(self.members)
        total: np.ndarray | None = None
        for i, m in enumerate(self.members):
            def member_progress(done: int, _n: int, i: int = i) -> None:
                if progress:
                    progress(i * n + done, k * n)
            z = m.logits(x, batch_size, member_progress)
            if total is not None and z.shape[1] != total.shape[1]:
                raise TeacherError(f"TEACHER {m.name}: gives {z.shape[1]} classes but "
                                   f"{self.members[0].name} gives {total.shape[1]}")
            total = z.astype(np.float64) if total is None else total + z
        assert total is not None
        return (total / k).astype(np.float32)


def load_teacher(paths: list[str | Path], output: str | None = None, device: str = "auto") -> Teacher:
    """One teacher per path (ONNX for now); several paths make an ensemble."""
    if not paths:
        raise TeacherError("TEACHER: give at least one model file")
    teachers: list[Teacher] = []
    for p in paths:
        suffix = Path(p).suffix.lower()
        if suffix != ".onnx" and Path(p).exists():
            raise TeacherError(f"TEACHER {p}: unsupported model format '{suffix}'; "
                               "export it to ONNX (torch.onnx.export) and pass the .onnx file")
        teachers.append(OnnxTeacher(p, output=output, device=device))
    return teachers[0] if len(teachers) == 1 else EnsembleTeacher(teachers)
