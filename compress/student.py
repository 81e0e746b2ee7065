"""The student: a wide, shallow net with a linear bottleneck (Ba & Caruana 2014, section 2.2).

    x -> flatten -> Linear(D, k, no bias) -> Linear(k, H) -> ReLU -> Linear(H, C)

k is the rank (0: no bottleneck, `Linear(D, H)`), H the width. The bottleneck factors the D x H
input weights into D x k and k x H, which is what made training a 400k-wide SNN-MIMIC net feasible.
torch is imported only where a model is built, so parsing options stays cheap.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from compress.errors import ConfigError

if TYPE_CHECKING:
    import torch

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000}
FORMAT = "compress-student/1"  # student.pt's format tag; load_student reads this one only


@dataclass(frozen=True)
class StudentConfig:
    sample_shape: tuple[int, ...]  # one input sample, without the batch axis; flattened to D
    num_classes: int  # C, the teacher's logits
    width: int  # H, hidden ReLU units
    rank: int  # k, the linear bottleneck; 0 = none

    @property
    def input_dim(self) -> int:
        return math.prod(self.sample_shape)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sample_shape"] = list(self.sample_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentConfig:
        return cls(tuple(int(v) for v in d["sample_shape"]), int(d["num_classes"]), int(d["width"]),
                   int(d["rank"]))

    def validate(self) -> None:
        if self.width < 1:
            raise ConfigError(f"--width: must be at least 1, got {self.width}")
        if self.rank < 0:
            raise ConfigError(f"--rank: must be 0 (no bottleneck) or more, got {self.rank}")


def parse_width(text: str | int) -> int:
    """'8000', '8k', '400k', '1.5M' -> int. Raises ValueError with a readable message."""
    s = str(text).strip().lower().replace("_", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", s)
    if not m:
        raise ValueError(f"'{text}' is not a width; use a whole number like 8000, 8k, 400k or 1.5M")
    value = float(m.group(1)) * _SUFFIX[m.group(2)]
    if value != int(value):
        raise ValueError(f"'{text}' is not a whole number of units")
    if value < 1:
        raise ValueError(f"'{text}': the width must be at least 1")
    return int(value)


def count_params(cfg: StudentConfig) -> int:
    """D*k + k*H + H + H*C + C with a bottleneck, D*H + H + H*C + C without (from the config alone)."""
    d, k, h, c = cfg.input_dim, cfg.rank, cfg.width, cfg.num_classes
    first = d * k + k * h + h if k > 0 else d * h + h
    return first + h * c + c


def flops_per_sample(cfg: StudentConfig) -> int:
    """Multiply-adds x 2 for one forward pass; forward + backward is about 3x this."""
    d, k, h, c = cfg.input_dim, cfg.rank, cfg.width, cfg.num_classes
    weights = (d * k + k * h if k > 0 else d * h) + h * c
    return 2 * weights


def build_student(cfg: StudentConfig) -> torch.nn.Sequential:
    """The student as a torch module; layer names are what `student.pt` and the exporter use."""
    from collections import OrderedDict

    from torch import nn

    cfg.validate()
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    if cfg.rank > 0:
        layers["bottleneck"] = nn.Linear(cfg.input_dim, cfg.rank, bias=False)  # (N, D) -> (N, k)
        layers["hidden"] = nn.Linear(cfg.rank, cfg.width)  # (N, k) -> (N, H)
    else:
        layers["hidden"] = nn.Linear(cfg.input_dim, cfg.width)  # (N, D) -> (N, H)
    layers["relu"] = nn.ReLU()
    layers["out"] = nn.Linear(cfg.width, cfg.num_classes)  # (N, H) -> (N, C)
    return nn.Sequential(layers)


def save_student(model: torch.nn.Module, cfg: StudentConfig, path: str, meta: dict[str, Any],
                 check_inputs: Any = None) -> None:
    """`student.pt`: config, teacher signature, state dict, and a few held-out inputs that later
    exports are checked on; loadable with weights_only=True."""
    import torch

    from compress.atomic import atomic_path

    payload = {"format": FORMAT, "config": cfg.to_dict(), "meta": meta,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if check_inputs is not None:
        payload["check_inputs"] = torch.as_tensor(check_inputs, dtype=torch.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: a full disk raises OSError
        torch.save(payload, f)


def load_student(path: str) -> tuple[torch.nn.Sequential, StudentConfig, dict[str, Any]]:
    """The model, its config, and its meta (with `check_inputs` as a numpy array when stored)."""
    # No pickled code is ever executed: weights_only=True.
    import torch

    def bad(why: str) -> ConfigError:
        return ConfigError(f"STUDENT {path}: not a usable student.pt written by compress ({why})")

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"STUDENT {path}: file not found") from None
    except Exception as e:
        raise bad(type(e).__name__) from None
    if not isinstance(payload, dict):
        raise bad(f"holds {type(payload).__name__}")
    if payload.get("format") != FORMAT:
        raise bad(f"format {payload.get('format')!r}; this version reads {FORMAT!r}")
    try:
        cfg = StudentConfig.from_dict(payload["config"])
        cfg.validate()
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise bad(f"config: {type(e).__name__} {e}") from None
    model = build_student(cfg)
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise bad("no state_dict")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise bad(f"weights: {str(e).splitlines()[0][:160]}") from None
    model.eval()
    meta = dict(payload.get("meta", {})) if isinstance(payload.get("meta"), dict) else {}
    sig = meta.get("signature")
    needed = {"input_name": str, "sample_shape": (list, tuple), "input_dtype": str, "output_name": str}
    if not isinstance(sig, dict) or any(not isinstance(sig.get(k), t) for k, t in needed.items()):
        raise bad("no teacher signature (input and output names, shape, dtype)")
    if list(sig["sample_shape"]) != list(cfg.sample_shape):
        raise bad(f"signature shape {sig['sample_shape']} vs config {list(cfg.sample_shape)}")
    if "check_inputs" in payload:
        check = payload["check_inputs"]
        if not isinstance(check, torch.Tensor) or check.ndim < 1 or check.shape[0] == 0 or \
                tuple(check.shape[1:]) not in (tuple(cfg.sample_shape), (cfg.input_dim,)):
            raise bad("check_inputs are empty or not shaped like the student's input")
        meta["check_inputs"] = check.numpy()
    return model, cfg, meta
