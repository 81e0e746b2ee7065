"""`compress fit`: a student from inputs and the logits computed from them earlier (`compress targets`),
no teacher needed. The same checks, training, export and report as `distill` (compress.pipeline),
without the teacher's stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compress import data as data_mod
from compress import jsonio
from compress.atomic import exclusive, refuse_overwrite
from compress.errors import ConfigError, DataError
from compress.pipeline import (
    LOCK,
    DistillOptions,
    StageProgress,
    check_checkpoint,
    check_device,
    holdout_split,
    out_writes,
    write_text,
)
from compress.plan import check_memory, student_config
from compress.student import StudentConfig, count_params

# every name fit may write in --out (temporary and hidden ones under ".*"), for refuse_overwrite
FIT_WRITES = ("student*.onnx*", "student.pt", "report.*", "checkpoint.pt", ".*")


def fit_targets(data: str | Path, targets: str | Path, opts: DistillOptions = DistillOptions(),
                input_name: str = "input", output_name: str = "logits",
                progress: StageProgress | None = None) -> dict[str, Any] | None:
    """`compress fit`: a student from inputs and logits computed earlier (`compress targets`), no
    teacher needed. Writes student.pt, student.onnx (input and output named as given) and report.json
    with the training and export sections and the fit on the held-out 10% of the data."""
    from compress import distributed

    def say(stage: str, **info: Any) -> None:
        if progress:
            progress(stage, info)

    opts.fit.validate()
    for option, name in (("--input-name", input_name), ("--output-name", output_name)):
        if not name.strip() or name != name.strip():
            raise ConfigError(f"{option}: '{name}' is not a usable ONNX name (empty, or spaces at an end)")
    if input_name == output_name:
        raise ConfigError(f"--output-name: '{output_name}' is also the input's name; ONNX needs two names")
    refuse_overwrite({"--data": data, "--targets": targets}, out_writes("--out", opts.out_dir, FIT_WRITES))
    check_device(opts.fit.device)
    data_mod.check_key(opts.key, data)
    if opts.resume:
        check_checkpoint(Path(opts.out_dir) / "checkpoint.pt")
    from compress.teachers.onnx_teacher import INTEGER_TYPES

    raw = data_mod.open_inputs(data, None, what="--data", key=opts.key)
    # pixels stored as uint8 (int8, uint16, int16) came from a teacher of that input: the student takes
    # them as it did, and they are held as they are, as distill holds them; any float data gives float32
    integer = raw.dtype in {np.dtype(t) for t in INTEGER_TYPES.values()}
    input_dtype = raw.dtype.name if integer else "float32"
    x = np.ascontiguousarray(raw[0 : len(raw)], dtype=raw.dtype if integer else np.float32)
    z = np.asarray(data_mod.load_array(targets, what="--targets"), dtype=np.float32)
    if z.ndim != 2 or len(z) != len(x):
        raise DataError(f"--targets {targets}: shape {z.shape}; expected ({len(x)}, classes), one row of "
                        "logits per --data sample")
    data_mod.check_finite(z, targets, what="--targets")
    train_idx, val_idx = holdout_split(len(x), opts.fit.seed)
    cfg = student_config(tuple(int(v) for v in x.shape[1:]), z.shape[1], opts.width, opts.rank, opts.student,
                         layout=opts.layout)
    check_memory(cfg, opts.fit, 0, spec=opts.student)  # the data is in memory already
    out = Path(opts.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    with exclusive(out / LOCK, f"--out {out}") if distributed.is_rank0() else contextlib.nullcontext():
        return _fit_targets(x, z, train_idx, val_idx, cfg, out, opts, input_name, output_name, input_dtype,
                            say)


def _fit_targets(x: np.ndarray, z: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                 cfg: StudentConfig, out: Path, opts: DistillOptions, input_name: str, output_name: str,
                 input_dtype: str, say: Callable[..., None]) -> dict[str, Any] | None:
    """fit_targets() once its inputs are read and its folder is locked."""
    from compress import distributed
    from compress import evaluate as ev
    from compress.exporters.onnx import export_onnx
    from compress.fit import fit
    from compress.student import save_student
    from compress.teachers import Signature

    world = distributed.init()
    result = fit(data_mod.Rows(x, train_idx), data_mod.Rows(z, train_idx), x[val_idx], z[val_idx], cfg,
                 opts.fit, lambda info: say("fit", **info), checkpoint=str(out / "checkpoint.pt"),
                 resume=opts.resume, world=world)
    if not world.main:
        distributed.finish(world)
        return None
    say("export")
    sig = Signature(input_name, cfg.sample_shape, input_dtype, output_name, None)
    save_student(result.model, cfg, str(out / "student.pt"), {"signature": dataclasses.asdict(sig)},
                 check_inputs=x[val_idx[:256]])
    exp = export_onnx(result.model, cfg, sig, out / "student.onnx", x[val_idx])
    (out / "checkpoint.pt").unlink(missing_ok=True)
    zs = ev.run_onnx(exp.path, x[val_idx])
    report = {
        "student": {"params": count_params(cfg), "size_bytes": exp.size_bytes, "width": cfg.width,
                    "rank": cfg.rank, "input_dim": cfg.input_dim, "classes": cfg.num_classes,
                    "spec": cfg.spec, "layers": [layer.token for layer in cfg.layers()]},
        "fidelity": {"agreement": ev.agreement(zs, z[val_idx]), "logit_rmse": ev.logit_rmse(zs, z[val_idx]),
                     "on": "the held-out 10% of --data"},
        "export": {"path": str(Path(exp.path).resolve()), "max_abs_diff": exp.max_abs_diff},
        "train": {**result.report(), "samples": int(train_idx.size)},
    }
    write_text(out / "report.json", jsonio.dumps(report) + "\n")
    distributed.finish(world)
    return report
