"""Teachers: trained models that hand back logits, run in batches.

A teacher is anything with the `Teacher` protocol: `OnnxTeacher` (onnxruntime), `TorchTeacher`
(TorchScript, torch.export programs, state dict + architecture), and `EnsembleTeacher`, the mean of
several teachers' logits (the paper's strongest teachers were ensembles; Ba & Caruana 2014, 2.1).

A teacher whose output holds probabilities is turned into logits here: log(p), p clipped away from 0,
centred per row (the paper trains on logits because they carry more than probabilities do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from compress.errors import TeacherError

Progress = Callable[[int, int], None]  # (samples done, samples in all)

P_MIN = 1e-7  # probabilities are clipped to [P_MIN, 1] before the log


@dataclass(frozen=True)
class Signature:
    """The teacher's input and output, as the student's ONNX export must copy them."""

    input_name: str
    sample_shape: tuple[int | None, ...] | None  # one sample, no batch axis; None: whatever the data has
    input_dtype: str  # numpy dtype name, e.g. "float32"
    output_name: str
    batch: int | None  # a batch size baked into the model, or None when the batch axis is dynamic
    # token-id teachers (compress.tokens): every input's name and dtype, in the model's order; a sample
    # is then the (I, L) stack of them. Empty for a teacher of one float input.
    inputs: tuple[str, ...] = ()
    input_dtypes: tuple[str, ...] = ()
    # the output of one sample when it is not (classes,): (classes, 1, 1) from a classifier that ends in
    # a 1x1 convolution (SqueezeNet), (1, classes); -1 stands for the classes. The student's ONNX file
    # gives the same shape; everything else reads the scores as (N, classes) (`scores`).
    output_shape: tuple[int, ...] | None = None

    @property
    def tokens(self) -> bool:
        return bool(self.inputs)

    @property
    def data_dtype(self) -> np.dtype:
        """What the transfer data is held in: stacked int64 token ids; the teacher's own integers (uint8
        pixels: exact, and a quarter of float32's memory); else float32 (the student's arithmetic)."""
        if self.tokens:
            return np.dtype(np.int64)
        own = np.dtype(self.input_dtype)
        return own if own.kind in "iu" else np.dtype(np.float32)

    @classmethod
    def from_dict(cls, d: dict) -> Signature:
        shape = d.get("sample_shape")
        out = d.get("output_shape")
        return cls(**{**d, "sample_shape": None if shape is None else tuple(shape),
                      "inputs": tuple(d.get("inputs", ())), "input_dtypes": tuple(d.get("input_dtypes", ())),
                      "output_shape": None if out is None else tuple(int(v) for v in out)})


def squeezable(shape: tuple[int | None, ...]) -> bool:
    """Whether one sample's output of this shape is a vector of class scores with axes of size 1 around
    it: (10, 1, 1), (1, 10); None (unknown) counts as the classes' axis."""
    return len(shape) > 1 and sum(d != 1 for d in shape) == 1


def scores(y: np.ndarray, n: int) -> np.ndarray | None:
    """A model's output for n samples as (n, classes): as it is when 2-D, without its size-1 axes when it
    is (n, classes, 1, 1) or the like; None when it is neither."""
    if y.ndim == 2 and y.shape[0] == n:
        return y
    if y.ndim > 2 and y.shape[0] == n and squeezable(y.shape[1:]):
        return y.reshape(n, -1)
    return None


class Teacher(Protocol):
    name: str
    signature: Signature
    params: int | None
    size_bytes: int
    output_kind: str  # "logits" or "probabilities" (known after the first batch)

    def logits(self, x: np.ndarray, batch_size: int = 1024, progress: Progress | None = None
               ) -> np.ndarray: ...


def gpu_available() -> bool:
    """True when torch sees a CUDA device (onnxruntime-gpu lists CUDA even on machines without one)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def check_model_file(path: Path) -> int:
    """The file's size, after checking it exists, is a file and can be read (TeacherError if not)."""
    if not path.exists():
        raise TeacherError(f"TEACHER {path}: file not found")
    if path.is_dir():
        raise TeacherError(f"TEACHER {path}: is a folder, not a model file")
    try:
        with open(path, "rb"):
            pass
        return path.stat().st_size
    except OSError as e:
        raise TeacherError(f"TEACHER {path}: cannot be read ({e.strerror or e})") from None


def looks_like_probabilities(y: np.ndarray) -> bool:
    """Rows of non-negative values summing to 1: a softmax (or a normalizer) ended the model."""
    return bool(y.size and (y >= 0).all() and (y <= 1 + 1e-6).all()
                and np.allclose(y.sum(axis=1), 1.0, atol=1e-3))


def probabilities_to_logits(p: np.ndarray) -> np.ndarray:
    """log(p) with p clipped to [P_MIN, 1], centred per row: logits up to the softmax's free shift."""
    logp = np.log(np.clip(p.astype(np.float64), P_MIN, 1.0))
    return (logp - logp.mean(axis=1, keepdims=True)).astype(np.float32)


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


class EnsembleTeacher:
    """The mean of its members' logits. Members must agree on input shape and class count."""

    def __init__(self, members: list[Teacher]):
        first = members[0]
        for m in members[1:]:
            a, b = m.signature.sample_shape, first.signature.sample_shape
            if a is not None and b is not None and a != b:
                raise TeacherError(f"TEACHER {m.name}: input shape {a} differs from {first.name}'s {b}")
        self.members = members
        self.name = " + ".join(m.name for m in members)
        known = [m.signature for m in members if m.signature.sample_shape is not None]
        self.signature = known[0] if known else first.signature  # an ONNX member's interface first
        # a member of integer inputs (uint8 pixels) decides the data's type, so that the data is checked
        # for it; float members take those integers as floats. Two integer types cannot both hold it.
        ints = [m for m in members
                if not m.signature.tokens and np.dtype(m.signature.input_dtype).kind in "iu"]
        for m in ints[1:]:
            if m.signature.input_dtype != ints[0].signature.input_dtype:
                raise TeacherError(f"TEACHER {m.name}: takes {m.signature.input_dtype} inputs but "
                                   f"{ints[0].name} takes {ints[0].signature.input_dtype}; an ensemble's "
                                   "members must read the same integers")
        if ints:
            self.signature = ints[0].signature
        counts = [m.params for m in members]
        self.params = None if any(c is None for c in counts) else sum(counts)  # type: ignore[arg-type]
        self.size_bytes = sum(m.size_bytes for m in members)

    @property
    def output_kind(self) -> str:
        kinds = {m.output_kind for m in self.members}
        return kinds.pop() if len(kinds) == 1 else "mixed"

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


def load_teacher(paths: list[str | Path], output: str | None = None, device: str = "auto",
                 arch: str | None = None, trust_pickle: bool = False) -> Teacher:
    """One teacher per path: `.onnx` runs on onnxruntime, anything else is tried as a PyTorch file
    (TorchScript, torch.export, or a state dict with `arch`). Several paths make an ensemble."""
    from compress.teachers.onnx_teacher import OnnxTeacher
    from compress.teachers.torch_teacher import TorchTeacher

    if not paths:
        raise TeacherError("TEACHER: give at least one model file")
    teachers: list[Teacher] = []
    for p in paths:
        if Path(p).suffix.lower() == ".onnx":
            teachers.append(OnnxTeacher(p, output=output, device=device))
        else:
            teachers.append(TorchTeacher(p, arch=arch, trust_pickle=trust_pickle, device=device))
    return teachers[0] if len(teachers) == 1 else EnsembleTeacher(teachers)


__all__ = ["EnsembleTeacher", "Progress", "Signature", "Teacher", "check_model_file", "gpu_available",
           "load_teacher", "looks_like_probabilities", "probabilities_to_logits", "run_batched"]


def __getattr__(name: str) -> object:  # OnnxTeacher / TorchTeacher without importing both eagerly
    if name == "OnnxTeacher":
        from compress.teachers.onnx_teacher import OnnxTeacher

        return OnnxTeacher
    if name == "TorchTeacher":
        from compress.teachers.torch_teacher import TorchTeacher

        return TorchTeacher
    if name in ("ort_providers", "onnx_param_count"):
        from compress.teachers import onnx_teacher

        return getattr(onnx_teacher, name)
    raise AttributeError(name)
