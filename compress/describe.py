"""What a model file is, as `compress inspect` shows it: format, inputs, outputs (and whether each looks
like logits, probabilities or labels), parameter count, and what `distill` would do with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.errors import CompressError, TeacherError


def _dims(shape: Any) -> list[Any]:
    return [d if isinstance(d, int) and d > 0 else (d or "?") for d in shape]


def describe_onnx(path: Path, output: str | None) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    from compress.onnxfiles import onnx_size
    from compress.teachers.onnx_teacher import (
        OnnxTeacher,
        onnx_param_count,
        output_kind_guess,
        pick_output,
        session_options,
    )

    try:
        model = onnx.load(str(path), load_external_data=False)
        sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise TeacherError(f"MODEL {path}: not a valid ONNX model ({type(e).__name__})") from None
    info: dict[str, Any] = {
        "path": str(path), "format": "onnx", "size_bytes": onnx_size(path),
        "params": onnx_param_count(model), "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip() or None,
        "inputs": [{"name": i.name, "shape": _dims(i.shape), "type": i.type} for i in sess.get_inputs()],
        "outputs": [{"name": o.name, "shape": _dims(o.shape), "type": o.type,
                     "looks_like": output_kind_guess(model, o.name, o.type)} for o in sess.get_outputs()],
    }
    from compress.student import conv_kind

    shape = info["inputs"][0]["shape"][1:] if len(info["inputs"]) == 1 else None
    info["student_convolution"] = conv_kind(tuple(shape) if shape is not None else None)
    try:
        teacher = OnnxTeacher(path, output=output, device="cpu")
        info["distill_uses"] = pick_output(sess.get_outputs(), output, path).name
        if teacher.signature.tokens:
            from compress.tokens import roles

            names = teacher.signature.inputs
            r = roles(names)
            info["student_convolution"] = None
            mask = f", mask '{names[r.mask]}'" if r.mask is not None else ""
            info["token_student"] = (
                f"token ids from '{names[r.ids]}'{mask}; distill takes an .npz with one array per input "
                "and builds an embedding bag (V x k, the mean over the kept tokens) -> the wide ReLU layer "
                "(--student 64L-2k)")
        info["usable"], info["why"] = True, None
    except CompressError as e:
        info["distill_uses"], info["usable"], info["why"] = None, False, str(e)
    return info


def describe_torch(path: Path, arch: str | None, trust_pickle: bool) -> dict[str, Any]:
    from compress.student import conv_kind
    from compress.teachers.torch_teacher import TorchTeacher, file_kind

    if path.is_dir():
        raise TeacherError(f"MODEL {path}: is a folder, not a model file")
    kind = file_kind(path)
    info: dict[str, Any] = {"path": str(path), "format": {"torchscript": "torchscript",
                                                          "export": "torch.export program",
                                                          "torch-save": "torch.save checkpoint"}.get(
                                                              kind, "unknown"),
                            "size_bytes": path.stat().st_size}
    try:
        t = TorchTeacher(path, arch=arch, trust_pickle=trust_pickle, device="cpu")
    except CompressError as e:
        if kind == "unknown":  # not a model at all: exit 2, as for a file that is not ONNX
            raise TeacherError(f"MODEL {path}: not an ONNX or PyTorch model file") from None
        info.update(usable=False, why=str(e), params=None, inputs=None, outputs=None, distill_uses=None)
        return info
    shape = t.signature.sample_shape
    info.update(
        usable=True, why=None, params=t.params,
        inputs=[{"name": "input", "shape": ["batch" if t.signature.batch is None else t.signature.batch,
                                             *(_dims(shape) if shape is not None else ["(from the data)"])],
                 "type": "float32"}],
        outputs=[{"name": "(return value)", "shape": ["batch", "classes"], "type": "float32",
                  "looks_like": "logits or probabilities (decided on the first batch)"}],
        distill_uses="the module's return value",
        student_convolution=conv_kind(shape),
    )
    return info


def describe(path: str | Path, output: str | None = None, arch: str | None = None,
             trust_pickle: bool = False) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise TeacherError(f"MODEL {path}: file not found")
    if path.suffix.lower() == ".onnx":
        return describe_onnx(path, output)
    return describe_torch(path, arch, trust_pickle)
