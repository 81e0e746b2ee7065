"""`distill`: every stage in order, teacher to shipped student, as one library call.

All input is checked before any work that takes time or writes files: a bad file or option fails
in a second, and never leaves a `student.onnx` behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress import data as data_mod
from compress import jsonio
from compress.atomic import atomic_path, exclusive, refuse_overwrite
from compress.errors import ConfigError, DataError, ExportError, TeacherError
from compress.fit import FitConfig
from compress.plan import check_memory, student_config, student_vocab
from compress.student import StudentConfig, count_params
from compress.teachers import OnnxTeacher, load_teacher

StageProgress = Callable[[str, dict[str, Any]], None]  # (stage, details)

HOLDOUT_FRACTION = 0.1  # of the transfer data, for validation and (without --eval-data) the report
HOLDOUT_MAX = 10_000
MIN_TRANSFER = 10
LOCK = ".compress.lock"  # in --out: held by the run writing there
# every name distill may write in --out (temporary and hidden ones under ".*"), for refuse_overwrite
DISTILL_WRITES = ("student*.onnx*", "student.pt", "report.*", "checkpoint.pt", "targets*.npy",
                  "targets*.json", "augmented_*.npy", ".*")


def out_writes(option: str, folder: str | Path, patterns: tuple[str, ...]) -> list[tuple[str, Path, str]]:
    return [(f"{option} {folder}", Path(folder), p) for p in patterns]


@dataclass(frozen=True)
class DistillOptions:
    width: int = 8000  # H
    rank: int | None = None  # k; None: min(250, D // 2)
    student: str | None = None  # the paper's notation (64c-p-1200L-30k); replaces width and rank
    layout: str = "auto"  # where a conv student finds the channels: auto, first, last (student.LAYOUTS)
    out_dir: str = "compress-out"
    fit: FitConfig = field(default_factory=FitConfig)
    output: str | None = None  # the teacher output to use; None: its first float output
    arch: str | None = None  # package.module:factory for state-dict teachers
    trust_pickle: bool = False  # allow loading a whole pickled module (runs code from the file)
    key: str | None = None  # the array to use in .npz files
    teacher_batch_size: int = 1024
    latency_batches: tuple[int, ...] = (1, 256)
    precisions: tuple[str, ...] = ()  # extra exports besides fp32: "fp16", "int8"
    min_agreement: float = 0.99  # of each extra export with the fp32 student, on held-out inputs
    quantize: str = "weights"  # int8 method: "weights", "dynamic" or "static" (see exporters/quantize)
    latency_budget_s: float = 1.0  # timing per model and batch size (--bench-seconds)
    augment: str | None = None  # "munge:20", "noise:5", "mixup:4": synthetic transfer data
    memory_budget: int | None = None  # bytes of training data held in memory; None: a quarter of RAM
    resume: bool = False  # keep a finished run of the same inputs and options; else continue its checkpoint
    cache_dir: str | None = None  # where the logit cache lives; None: out_dir (sweep shares one)
    vocab_size: int | None = None  # token-id teachers: the student's V; None: the data's largest id + 1
    mask_id: int | None = None  # token-id teachers, --augment mask: the id that replaces tokens
    ngrams: int = 1  # token-id teachers: hashed n-grams up to this n join the bag
    buckets: int | None = None  # their hash rows; None: NGRAM_BUCKETS when ngrams > 1


def check_device(device: str) -> None:
    """--device cuda on a machine where torch sees no GPU: refused before any teacher runs."""
    if device == "cuda":
        from compress.fit import resolve_device

        resolve_device(device)


def check_checkpoint(path: Path) -> None:
    """--resume with a file at `path` that is not a checkpoint: refused before the teacher runs (its
    run record is compared later, once the statistics it holds are known)."""
    import torch

    if not path.exists():
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        ok = isinstance(state, dict) and isinstance(state.get("run"), dict) and "epoch" in state
    except Exception:  # noqa: BLE001 - any unreadable file is the same answer
        ok = False
    if not ok:
        raise ConfigError(f"--resume: {path} is not a readable checkpoint; delete it to start afresh")


def holdout_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, held-out) indices: 10% held out, at most 10,000, at least 1."""
    if n < MIN_TRANSFER:
        raise DataError(f"--data: {n} samples is too few to distill from (need {MIN_TRANSFER})")
    n_val = int(min(HOLDOUT_MAX, max(1, round(HOLDOUT_FRACTION * n))))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def run_record(opts: DistillOptions, inputs: dict[str, Any], eval_data: str | Path | None,
               eval_labels: str | Path | None, cfg: StudentConfig) -> dict[str, Any]:
    """What a run's outputs depend on: the teachers and data (the logit cache's key: path, size and
    modification time of each file), the evaluation files, the student, and every option that changes
    a result. `report.json` keeps it under "run"; `--resume` keeps a finished run whose record matches."""
    from compress.targets import data_key

    options = dataclasses.asdict(opts)
    for name in ("out_dir", "resume", "cache_dir", "trust_pickle", "teacher_batch_size"):
        del options[name]
    record = {"inputs": inputs, "eval_data": data_key(eval_data) if eval_data is not None else None,
              "eval_labels": data_key(eval_labels) if eval_labels is not None else None,
              "student": cfg.to_dict(), "options": options}
    return json.loads(json.dumps(record))  # tuples as lists: equal to its own JSON round trip


def finished_run(out: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The report of a finished run in `out` with this record, its student still there; else None."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("run") != record:
        return None
    return report if (out / "student.onnx").exists() and (out / "student.pt").exists() else None


def default_memory_budget() -> int:
    """A quarter of physical memory (8 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def write_plot(report: dict[str, Any], path: Path) -> str | None:
    """The figure beside the report; without matplotlib, a note in the report instead."""
    from compress.plot import MISSING, plot_report

    try:
        plot_report(report, path)
    except ImportError:
        report["plot_missing"] = MISSING
        return None
    return path.name


def distill(teachers: list[str | Path], data: str | Path, opts: DistillOptions = DistillOptions(),
            eval_data: str | Path | None = None, eval_labels: str | Path | None = None,
            progress: StageProgress | None = None) -> dict[str, Any] | None:
    """Distill `teachers` (one, or an ensemble) on the transfer data; write the student, its ONNX
    export and the report into `opts.out_dir`; return the report. Under torchrun every rank labels
    and trains its share; rank 0 alone writes files and returns the report (the others None).
    With `opts.resume`, a run that already finished in `opts.out_dir` with the same inputs and options
    (`run_record`) is not run again: its report comes back, with "reused": true (not in the file)."""
    with contextlib.ExitStack() as held:
        return _distill(teachers, data, opts, eval_data, eval_labels, progress, held)


def _check_options(teachers: list[str | Path], opts: DistillOptions, eval_data: str | Path | None,
                   eval_labels: str | Path | None) -> tuple[str, int] | None:
    """The options that can be refused before anything is read; returns the parsed --augment."""
    from compress.exporters.quantize import PRECISIONS

    for p in opts.precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"--precision: {p} is not one of {', '.join(PRECISIONS)}")
    if not 0.0 <= opts.min_agreement <= 1.0:
        raise ConfigError(f"--min-agreement: must be between 0 and 1, got {opts.min_agreement}")
    if opts.quantize != "weights" and "int8" not in opts.precisions:
        raise ConfigError(f"--quantize {opts.quantize}: applies to the int8 export; add --precision int8")
    if opts.arch is not None and all(Path(t).suffix.lower() == ".onnx" for t in teachers):
        raise ConfigError("--arch: applies to PyTorch state-dict teachers; the teachers here are ONNX files")
    from compress.augment import parse_augment

    augment = parse_augment(opts.augment)
    if eval_labels is not None and eval_data is None:
        raise ConfigError("--eval-labels: needs --eval-data (the inputs those labels belong to)")
    opts.fit.validate()
    return augment


def _check_augment(augment: tuple[str, int], tokens: bool, opts: DistillOptions) -> None:
    """--augment's method must suit the teacher's inputs (token ids or features)."""
    from compress.augment import TOKEN_METHODS

    if tokens != (augment[0] in TOKEN_METHODS):
        fits = ("mask or ngram (e.g. mask:5)" if tokens else "munge, noise or mixup (e.g. munge:20)")
        raise ConfigError(f"--augment {opts.augment}: this teacher's inputs take {fits}")
    if augment[0] == "mask" and opts.mask_id is None:
        raise ConfigError(f"--augment {opts.augment}: give --mask-id, the tokenizer's [MASK] (or [UNK]) "
                          "id that replaces tokens (103 in BERT's WordPiece vocabulary)")


def _augmented(augment: tuple[str, int], x: Any, z: Any, train_idx: np.ndarray, teacher: Any,
               key: dict[str, Any], folder: Path, opts: DistillOptions,
               say: Callable[..., None]) -> tuple[np.ndarray, np.ndarray]:
    """The training rows and their logits, followed by synthetic transfer data made from them (never
    from the held-out part) and labelled by the teacher likewise; both cached in `folder`."""
    from compress.augment import generate
    from compress.targets import compute_targets, load_cached

    method, factor = augment
    tag = f"{method}{factor}_seed{opts.fit.seed}" + (f"_id{opts.mask_id}" if method == "mask" else "")
    x_real = x[train_idx]  # in memory: --augment needs the set to fit the budget
    x_syn = generate(x_real, method, factor, folder / f"augmented_{tag}.npy", opts.fit.seed,
                     lambda done, n: say("augment", done=done, total=n), teacher.signature.inputs,
                     opts.mask_id)
    syn_key = {**key, "augment": tag, "samples": int(len(x_syn))}
    z_syn = load_cached(folder / f"targets_{tag}.npy", syn_key)
    if z_syn is None:
        z_syn = compute_targets(teacher, x_syn, folder / f"targets_{tag}.npy", syn_key,
                                opts.teacher_batch_size, lambda done, n: say("targets", done=done, total=n))
    return np.concatenate([x_real, np.asarray(x_syn)]), np.concatenate([z[train_idx], np.asarray(z_syn)])


def _check_files(teachers: list[str | Path], data: str | Path, opts: DistillOptions,
                 eval_data: str | Path | None, eval_labels: str | Path | None) -> None:
    """The output folder, the files a run would write (none of them may be an input), the device, the
    data's --key and a checkpoint to resume: checked before any teacher is loaded."""
    out = Path(opts.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    writes = out_writes("--out", out, DISTILL_WRITES)
    if opts.cache_dir is not None:
        writes += out_writes("--out", opts.cache_dir, DISTILL_WRITES)
    refuse_overwrite({"TEACHER": list(teachers), "--data": data, "--eval-data": eval_data,
                      "--eval-labels": eval_labels}, writes)
    check_device(opts.fit.device)
    data_mod.check_key(opts.key, data, eval_data)
    if opts.resume:
        check_checkpoint(out / "checkpoint.pt")


def _compare(teacher: Any, student: OnnxTeacher, extra: list[dict[str, Any]], xc: np.ndarray,
             y_eval: np.ndarray | None, zt: np.ndarray,
             opts: DistillOptions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The teacher against the exported student on inputs xc (teacher logits zt, labels y_eval if any);
    each extra export (fp16, int8) gets its accuracy, agreement and latency written into its entry.
    Returns the comparison and, for an ensemble, each member's accuracy."""
    from compress import evaluate as ev

    cmp = ev.compare(teacher, student, xc, y_eval, zt, opts.latency_batches, opts.latency_budget_s)
    for e in extra:
        model = OnnxTeacher(e["path"], device=opts.fit.device)
        ze = model.logits(xc)
        e.update(accuracy=ev.accuracy(ze, y_eval), agreement=ev.agreement(ze, zt),
                 latency_ms=ev.model_latency(model, xc[:256], opts.latency_batches,
                                             opts.latency_budget_s))
    members = [{"name": m.name, "output_kind": m.output_kind,
                "accuracy": ev.accuracy(m.logits(xc), y_eval) if y_eval is not None else None}
               for m in getattr(teacher, "members", [])]
    return cmp, members


def _distill(teachers: list[str | Path], data: str | Path, opts: DistillOptions,
             eval_data: str | Path | None, eval_labels: str | Path | None,
             progress: StageProgress | None, held: contextlib.ExitStack) -> dict[str, Any] | None:
    """distill(); `held` keeps the output folder's lock until the caller's block ends."""
    from compress import distributed
    from compress import evaluate as ev
    from compress.exporters.onnx import export_onnx
    from compress.exporters.quantize import export_precision, refuse_too_large
    from compress.fit import fit
    from compress.student import save_student
    from compress.targets import cache_key, compute_targets, compute_targets_distributed, load_cached

    def say(stage: str, **info: Any) -> None:
        if progress:
            progress(stage, info)

    # 1. check everything that can be checked cheaply
    augment = _check_options(teachers, opts, eval_data, eval_labels)
    out = Path(opts.out_dir)
    _check_files(teachers, data, opts, eval_data, eval_labels)
    teacher = load_teacher(list(teachers), output=opts.output, device=opts.fit.device, arch=opts.arch,
                           trust_pickle=opts.trust_pickle)
    sig = teacher.signature
    dtype = sig.data_dtype  # stacked token ids (compress.tokens), the teacher's integers, or float32
    # not read yet (float inputs: a memory map or shards)
    x = data_mod.open_inputs(data, sig.sample_shape, what="--data", key=opts.key, inputs=sig.inputs,
                             dtype=sig.input_dtype)
    sample_shape = tuple(int(v) for v in x.shape[1:])
    x_eval = y_eval = None
    if eval_data is not None:
        x_eval = data_mod.load_inputs(eval_data, sample_shape if not sig.tokens else None, what="--eval-data",
                                      key=opts.key, inputs=sig.inputs, dtype=sig.input_dtype)
        if eval_labels is not None:
            y_eval = data_mod.load_labels(eval_labels, x_eval.shape[0])
    train_idx, val_idx = holdout_split(x.shape[0], opts.fit.seed)
    probe = teacher.logits(np.asarray(x[0:1], dtype=dtype))  # the class count; that it runs
    vocab = student_vocab(x, sig.inputs, opts)
    if not sig.tokens and (opts.ngrams > 1 or opts.buckets):
        raise ConfigError(f"--ngrams/--buckets: for token-id teachers; {teacher.name} takes float inputs")
    cfg = student_config(sample_shape, probe.shape[1], opts.width, opts.rank, opts.student, vocab,
                         sig.inputs, opts.ngrams, opts.buckets, opts.layout)
    for p in opts.precisions:
        refuse_too_large(cfg, p)
    if sig.tokens and opts.quantize != "weights" and "int8" in opts.precisions:
        raise ConfigError(f"--quantize {opts.quantize}: token-id students are quantized by weights (int8 "
                          "rows of the embedding table, each with its scale); leave out --quantize")
    if augment:
        _check_augment(augment, sig.tokens, opts)
    budget = opts.memory_budget or default_memory_budget()
    # inputs and logits of a row, at float32's 4 bytes a feature at least: uint8 pixels are held as they
    # are, but training holds them standardized in float32 (as float inputs are: the same plan)
    row_bytes = max(np.dtype(dtype).itemsize, 4) * cfg.input_dim + 4 * cfg.num_classes
    factor = augment[1] if augment else 1
    streamed = len(x) * factor * row_bytes > budget
    if streamed and augment:
        raise ConfigError(f"--augment: the augmented training set ({len(x) * factor * row_bytes / 2**30:.1f} "
                          f"GiB) does not fit the memory budget ({budget / 2**30:.1f} GiB); use a smaller "
                          "factor, or no --augment with a transfer set this large")
    check_memory(cfg, opts.fit, 0 if streamed else len(x) * factor * row_bytes, spec=opts.student)
    if not streamed:
        x = np.ascontiguousarray(x[0 : len(x)], dtype=dtype)  # in memory: faster to train on
    if y_eval is not None and y_eval.max() >= cfg.num_classes:
        raise DataError(f"--eval-labels {eval_labels}: has class {int(y_eval.max())} but the teacher "
                        f"gives {cfg.num_classes} classes")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    if distributed.is_rank0():  # the rank that writes; a second run on this folder fails here
        held.enter_context(exclusive(out / LOCK, f"--out {out}"))

    key = cache_key(list(teachers), data, sig.output_name, x.shape[0])
    record = run_record(opts, key, eval_data, eval_labels, cfg)
    if opts.resume and distributed.world_size() == 1:  # torchrun: ranks may not share the folder
        done = finished_run(out, record)
        if done is not None:
            return {**done, "reused": True}

    world = distributed.init()

    # 2. the teacher's logits over the transfer data, once
    cache = Path(opts.cache_dir or out) / "targets.npy"
    z = load_cached(cache, key)
    cached = z is not None
    distributed.barrier(world)  # every rank has looked at the cache before rank 0 may write it
    if z is None and world.size > 1:
        z = compute_targets_distributed(teacher, x, cache, key, world, opts.teacher_batch_size)
    elif z is None:
        z = compute_targets(teacher, x, cache, key, opts.teacher_batch_size,
                            lambda done, n: say("targets", done=done, total=n))
    try:
        data_mod.check_finite(z, cache, what="TEACHER logits")
    except DataError:
        raise TeacherError(f"TEACHER {teacher.name}: gave NaN or inf logits on the transfer data") from None
    if not streamed:
        z = np.asarray(z)
    # views, not copies: fit reads the training rows straight into its standardized tensors
    x_train, z_train = data_mod.Rows(x, train_idx), data_mod.Rows(z, train_idx)

    # 2b. synthetic transfer data from the training part (never the held-out part), labelled likewise
    n_synthetic = 0
    if augment is not None:
        x_train, z_train = _augmented(augment, x, z, train_idx, teacher, key, cache.parent, opts, say)
        n_synthetic = len(x_train) - len(train_idx)

    # 3. fit on the training part, score on the held-out part
    x_val = np.asarray(x[val_idx], dtype=dtype)
    # streamed: three blocks at most in memory at once (compress/feed.py reads the next one ahead)
    stream_rows = max(opts.fit.batch_size, budget // (3 * row_bytes)) if streamed else None
    checkpoint = out / "checkpoint.pt"
    result = fit(x_train, z_train, x_val, np.asarray(z[val_idx]), cfg, opts.fit,
                 lambda info: say("fit", **info), stream_rows=stream_rows,
                 checkpoint=str(checkpoint), resume=opts.resume, world=world)
    if not world.main:
        distributed.finish(world)
        return None
    if cfg.channels_last and opts.layout == "auto":  # a guess from the shape: said, with the way out
        result.notes.append(f"samples of shape {cfg.sample_shape} were read channels last (H, W, C), as "
                            "Keras and TensorFlow models take images; --layout first reads them as (C, H, W)")

    if sig.sample_shape and not sig.tokens and None in sig.sample_shape:  # e.g. images of any H and W
        free = ", ".join(str(i + 1) for i, d in enumerate(sig.sample_shape) if d is None)
        shape = ", ".join(str(d) for d in cfg.sample_shape)
        result.notes.append(f"the teacher takes inputs of any size along axis {free}; the student takes "
                            f"(N, {shape}) only (--data's samples): its dense layers fix the size. Resize "
                            "inputs to it before calling the student")

    # 4. keep the student: weights, then the validated ONNX files. Its interface is the teacher's,
    # with the data's sample shape (a PyTorch teacher records none) and a dynamic batch axis.
    say("export")
    sig = dataclasses.replace(sig, sample_shape=cfg.sample_shape, batch=None)
    meta = {"signature": dataclasses.asdict(sig), "teachers": [str(t) for t in teachers]}
    save_student(result.model, cfg, str(out / "student.pt"), meta, check_inputs=x_val[:256])
    check_x = x_eval if x_eval is not None else x_val
    exp = export_onnx(result.model, cfg, sig, out / "student.onnx", check_x)
    checkpoint.unlink(missing_ok=True)  # the student is kept: nothing left to resume
    try:
        extra = [export_precision(exp.path, out / f"student.{p}.onnx", p,  # from the checked fp32 file
                                  x_val, opts.min_agreement, opts.quantize,
                                  np.asarray(x[train_idx[:512]], dtype=dtype))
                 for p in opts.precisions if p != "fp32"]
    except ExportError as e:
        raise ExportError(f"{e}. The fp32 student is kept: {out / 'student.onnx'} and student.pt (no "
                          "report was written)") from None

    # 5. compare, with the exported file itself standing for the student
    say("compare")
    if x_eval is not None:
        xc, zt = x_eval, teacher.logits(x_eval, opts.teacher_batch_size)  # once, for every comparison
        source = f"--eval-data {Path(eval_data).name}"  # type: ignore[arg-type]
    else:
        xc, zt = x_val, np.asarray(z[val_idx])
        source = "the held-out slice of the transfer data"
    student = OnnxTeacher(exp.path, device=opts.fit.device)
    cmp, members = _compare(teacher, student, extra, xc, y_eval, zt, opts)
    report: dict[str, Any] = {
        "teacher": {**cmp["teacher"], "output": sig.output_name, "output_kind": teacher.output_kind,
                    **({"members": members} if members else {})},
        "student": {**cmp["student"], "params": count_params(cfg), "width": cfg.width,
                    "rank": cfg.rank, "input_dim": cfg.input_dim, "classes": cfg.num_classes,
                    "spec": cfg.spec, "layers": [layer.token for layer in cfg.layers()]},
        "fidelity": cmp["fidelity"],
        "export": {"path": str(Path(exp.path).resolve()), "max_abs_diff": exp.max_abs_diff,
                   "max_abs_diff_fp64": exp.max_abs_diff_fp64, "opset": 17},
        "exports": extra,
        "train": {**result.report(), "streamed": streamed or result.streamed, "samples": int(len(x_train)),
                  "lr": opts.fit.lr, "loss": opts.fit.loss, "seed": opts.fit.seed},
        "transfer": {"samples": int(x.shape[0]), "holdout": int(val_idx.size),
                     "real_train": int(train_idx.size), "synthetic": n_synthetic,
                     "augment": opts.augment or None,
                     "targets_cached": cached, "targets_path": str(cache.resolve())},
        "eval": {"source": source, "samples": int(xc.shape[0]), "labels": y_eval is not None},
        "latency_provider": student.session.get_providers()[0],
        "run": record,
    }
    plot = write_plot(report, out / "report.png")
    write_text(out / "report.json", jsonio.dumps(report) + "\n")
    write_text(out / "report.md", ev.render_markdown(report, plot))
    distributed.finish(world)
    return report
