"""PyTorch teachers: TorchScript files, torch.export programs (.pt2), and state dicts with `--arch`.

Loading is safe by default. TorchScript and torch.export archives hold code in their own formats,
not Python pickles; a plain `torch.save` file is read with `weights_only=True`, so it can only be
tensors and containers (a state dict), which needs `--arch package.module:factory` to become a model.
A whole pickled module runs arbitrary code when loaded: it is refused unless `trust_pickle` is set.
The file kind is told by the archive's entries, not by its suffix.
"""

from __future__ import annotations

import importlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import TeacherError
from compress.teachers import (
    Progress,
    Signature,
    check_model_file,
    looks_like_probabilities,
    probabilities_to_logits,
    run_batched,
    scores,
)

PICKLE_HELP = ("holds a pickled Python object (a whole module): loading it can run any code. Save it as "
               "TorchScript (torch.jit.script/trace + save), torch.export (.pt2), or a state dict used "
               "with --arch; or pass --trust-pickle if you trust where the file came from")


def file_kind(path: Path) -> str:
    """'torchscript', 'export', 'torch-save' or 'unknown', from the zip archive's entries."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "unknown"
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "archive_format" in tails:
        return "export"
    if "constants.pkl" in tails and any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        return "torch-save"
    return "unknown"


def load_factory(arch: str) -> Any:
    """`package.module:factory` -> the callable (importing the user's own module, by their choice)."""
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise TeacherError(f"--arch: '{arch}' should look like package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TeacherError(f"--arch: cannot import '{module_name}' ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TeacherError(f"--arch: '{module_name}' has no callable '{attr}'")
    return factory


def _call_factory(arch: str) -> Any:
    """The model from the user's factory; whatever it raises (SystemExit included) is one line."""
    import torch

    factory = load_factory(arch)
    try:
        model = factory()
    except (Exception, SystemExit) as e:
        raise TeacherError(f"--arch: {arch}() failed ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(model, torch.nn.Module):
        raise TeacherError(f"--arch: {arch}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _state_dict(obj: Any) -> dict[str, Any] | None:
    """The state dict inside a weights_only checkpoint: itself, or under a usual key."""
    import torch

    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model_state_dict", "model", "weights"):
            if key in obj and isinstance(obj[key], dict):
                return _state_dict(obj[key])
    return None


class TorchTeacher:
    def __init__(self, path: str | Path, arch: str | None = None, trust_pickle: bool = False,
                 device: str = "auto"):
        import torch

        self.path = Path(path)
        self.name = self.path.name
        self.size_bytes = check_model_file(self.path)
        self.device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
        self.kind = file_kind(self.path)
        batch, shape = None, None
        try:
            if self.kind == "torchscript":
                self.module = torch.jit.load(str(self.path), map_location=self.device)
            elif self.kind == "export":
                program = torch.export.load(str(self.path))
                batch, shape = self._export_input(program)
                self.module = program.module()
            else:
                self.module = self._from_checkpoint(arch, trust_pickle)
        except TeacherError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise TeacherError(f"TEACHER {self.path}: cannot load it as a PyTorch model ({first})") from None
        self.module = self.module.to(self.device)
        if self.kind != "export":  # an exported program keeps the mode it was captured in
            self.module.eval()
        self.params: int | None = sum(p.numel() for p in self.module.parameters())
        self.signature = Signature(input_name="input", sample_shape=shape, input_dtype="float32",
                                   output_name="logits", batch=batch)
        self.output_kind = "unknown"

    def _from_checkpoint(self, arch: str | None, trust_pickle: bool) -> Any:
        import pickle

        import torch

        try:
            obj = torch.load(str(self.path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            if self.kind != "torch-save":
                raise TeacherError(f"TEACHER {self.path}: not a PyTorch or ONNX model file") from None
            if not trust_pickle:
                raise TeacherError(f"TEACHER {self.path}: {PICKLE_HELP}") from None
            obj = torch.load(str(self.path), map_location="cpu", weights_only=False)
            if not isinstance(obj, torch.nn.Module):
                raise TeacherError(f"TEACHER {self.path}: the pickle holds {type(obj).__name__}, not a "
                                   "torch.nn.Module") from None
            return obj
        except (RuntimeError, EOFError, OSError, ValueError):
            raise TeacherError(f"TEACHER {self.path}: not a PyTorch or ONNX model file") from None
        state = _state_dict(obj)
        if state is None:
            raise TeacherError(f"TEACHER {self.path}: holds {type(obj).__name__}, not a model or a "
                               "state dict")
        if arch is None:
            raise TeacherError(f"TEACHER {self.path}: is a state dict (weights without the code that "
                               "uses them); add --arch package.module:factory, a function returning the "
                               "model to load them into")
        model = _call_factory(arch)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise TeacherError(f"--arch: the weights in {self.path} do not fit {arch}() "
                               f"({str(e).splitlines()[0]})") from None
        return model

    @staticmethod
    def _export_input(program: Any) -> tuple[int | None, tuple[int | None, ...] | None]:
        """Batch size and sample shape recorded in a torch.export program (ints where static)."""
        user = set(program.graph_signature.user_inputs)
        inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user]
        if len(inputs) != 1:
            raise TeacherError(f"TEACHER: the program takes {len(inputs)} inputs; compress needs one")
        val = inputs[0].meta.get("val")
        if val is None:
            return None, None
        dims = [d if isinstance(d, int) else None for d in val.shape]
        return dims[0], tuple(dims[1:])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.array(batch, dtype=np.float32))  # a copy: batch may be read-only
        with torch.no_grad():
            y = self.module(x.to(self.device))
        if isinstance(y, (tuple, list)):
            y = y[0]
        y2 = scores(y.float().cpu().numpy(), batch.shape[0])  # (N, C, 1, 1) and the like: (N, C)
        if y2 is None:
            raise TeacherError(f"TEACHER {self.path}: returns shape {tuple(y.shape)} for {batch.shape[0]} "
                               "samples; expected (N, classes)")
        y = y2
        if self.output_kind == "unknown":
            self.output_kind = "probabilities" if looks_like_probabilities(y) else "logits"
        return probabilities_to_logits(y) if self.output_kind == "probabilities" else y

    def logits(self, x: np.ndarray, batch_size: int = 1024, progress: Progress | None = None
               ) -> np.ndarray:
        from compress.threads import torch_threads, training_threads

        try:  # on the CPU, within a container's CPU quota, as training is (compress.threads)
            with torch_threads(training_threads()[0]):
                return run_batched(self._run, x, batch_size, self.signature.batch, progress)
        except TeacherError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0][:200]
            raise TeacherError(f"TEACHER {self.path}: failed on inputs of shape "
                               f"{tuple(x.shape[1:])} ({first})") from None
