"""Teacher vs student: accuracy, fidelity, latency, and the report that puts them side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

LATENCY_BATCHES = (1, 256)


def accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    if labels is None:
        return None
    return float((logits.argmax(axis=1) == labels).mean())


def agreement(student: np.ndarray, teacher: np.ndarray) -> float:
    """Top-1 fidelity: how often the student's top class is the teacher's."""
    return float((student.argmax(axis=1) == teacher.argmax(axis=1)).mean())


def logit_rmse(student: np.ndarray, teacher: np.ndarray) -> float:
    diff = student.astype(np.float64) - teacher.astype(np.float64)
    return float(np.sqrt((diff**2).mean()))


def onnx_session(path: str | Path, device: str = "cpu") -> Any:
    import onnxruntime as ort

    from compress.teachers.onnx_teacher import ort_providers, session_options

    return ort.InferenceSession(str(path), session_options(), providers=ort_providers(device))


def run_onnx(path: str | Path, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """The first output of an ONNX model, over x in batches (one input, or token inputs stacked)."""
    from compress.teachers import run_batched

    sess = onnx_session(path)
    inputs = sess.get_inputs()
    if len(inputs) > 1:  # token inputs, x their (N, I, L) stack (compress.tokens)
        from compress.tokens import feeds, names_and_dtypes

        names, dtypes = names_and_dtypes(inputs)
        return run_batched(lambda b: sess.run(None, feeds(names, dtypes, b))[0], x, batch_size)
    from compress.teachers.onnx_teacher import INPUT_TYPES

    dtype = INPUT_TYPES.get(inputs[0].type, np.float32)  # the model's own type: float16, uint8 pixels

    def run(b: np.ndarray) -> np.ndarray:
        y = sess.run(None, {inputs[0].name: b.astype(dtype, copy=False)})[0]
        return y.reshape(len(y), -1) if y.ndim > 2 else y  # (N, C, 1, 1) and the like as (N, C)

    return run_batched(run, x, batch_size)


def model_latency(model: Any, sample: np.ndarray, batches: tuple[int, ...] = LATENCY_BATCHES,
                  budget_s: float = 1.0) -> dict[str, dict[str, Any]]:
    """Latency of an `OnnxTeacher` (a teacher, or a student file loaded as one). An ensemble's
    members run one after another, so their percentiles are added up."""
    from compress.bench import latency, latency_of

    total: dict[str, dict[str, Any]] = {}
    for m in getattr(model, "members", [model]):
        if hasattr(m, "session"):
            lat = latency(m.session, sample, batches, m.signature.batch, budget_s)
        else:  # a PyTorch teacher: its own forward pass, timed the same way
            lat = latency_of(lambda x, m=m: m.logits(x, batch_size=x.shape[0]), sample, batches,
                             budget_s)
        for b, v in lat.items():
            acc = total.setdefault(b, {"p50": 0.0, "p90": 0.0, "p99": 0.0})
            for q in ("p50", "p90", "p99"):
                acc[q] += v[q]
            acc["method"] = v["method"]
    return total


def compare(teacher: Any, student: Any, x: np.ndarray, labels: np.ndarray | None = None,
            teacher_logits: np.ndarray | None = None, batches: tuple[int, ...] = LATENCY_BATCHES,
            budget_s: float = 1.0, labels_what: str = "labels") -> dict[str, Any]:
    """Teacher vs student on the same inputs: accuracy, agreement, logit RMSE, size, latency.

    Both are `Teacher`s (a student ONNX file loads as an `OnnxTeacher`). `teacher_logits`, when
    already known (the logit cache), saves running the teacher again.
    """
    zt = teacher.logits(x) if teacher_logits is None else np.asarray(teacher_logits)
    zs = student.logits(x)
    for who, model, z in (("TEACHER", teacher, zt), ("STUDENT", student, zs)):
        if not np.isfinite(z).all():
            from compress.errors import CompressError

            raise CompressError(f"{who} {model.name}: gives NaN or inf scores on these inputs (values "
                                "beyond float32's range, or a model that overflows); nothing to compare")
    if labels is not None and int(labels.max()) >= zt.shape[1]:
        from compress.errors import DataError

        raise DataError(f"{labels_what}: has class {int(labels.max())} but the teacher gives {zt.shape[1]} "
                        "classes")
    if zs.shape != zt.shape:
        from compress.errors import CompressError

        raise CompressError(f"STUDENT {student.name}: gives {zs.shape[1]} classes but the teacher "
                            f"gives {zt.shape[1]}")
    sample = x[:256]

    def side(model: Any, z: np.ndarray) -> dict[str, Any]:
        return {"name": model.name, "params": model.params, "size_bytes": model.size_bytes,
                "accuracy": accuracy(z, labels), "latency_ms": model_latency(model, sample, batches,
                                                                             budget_s)}

    return {"teacher": side(teacher, zt), "student": side(student, zs),
            "fidelity": {"agreement": agreement(zs, zt), "logit_rmse": logit_rmse(zs, zt)},
            "eval": {"samples": int(x.shape[0]), "labels": labels is not None}}


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "int":
        return f"{v:,}"
    if kind == "bytes":
        return f"{v / 1e6:.2f} MB" if v >= 1e5 else f"{v / 1e3:.1f} kB"
    if kind == "ms":
        return f"{v:.3f} ms"
    return str(v)


def comparison_columns(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (metric, teacher, student, each extra export) for the table and report.md."""
    t, s = report["teacher"], report["student"]
    fid = report["fidelity"]
    cols = [("teacher", t, None, None), ("student", s, fid["agreement"], fid["logit_rmse"])]
    cols += [(f"student {e['precision']}", e, e.get("agreement"), None) for e in report.get("exports", [])]
    cols[1] = ("student fp32" if len(cols) > 2 else "student", *cols[1][1:])
    batches = sorted({b for _, c, _, _ in cols for b in c.get("latency_ms", {})}, key=int)
    rows = [
        ["parameters", *[_fmt(c.get("params", s["params"]), "int") for _, c, _, _ in cols]],
        ["file size", *[_fmt(c["size_bytes"], "bytes") for _, c, _, _ in cols]],
        ["accuracy", *[_fmt(c.get("accuracy"), "pct") for _, c, _, _ in cols]],
        ["agreement with teacher", *[_fmt(a, "pct") for _, _, a, _ in cols]],
        ["logit RMSE vs teacher", *["-" if r is None else f"{r:.4f}" for _, _, _, r in cols]],
    ]
    for b in batches:
        for q in ("p50", "p99"):
            rows.append([f"latency batch {b} {q}",
                         *[_fmt(c.get("latency_ms", {}).get(b, {}).get(q), "ms") for _, c, _, _ in cols]])
    return ["metric", *[name for name, _, _, _ in cols]], rows


# how report.md names the training step (report.json's train.engine)
STEP_NAMES = {"split": ", the split CPU step", "graph": ", one CUDA graph a step", "autograd": ", autograd"}


def render_markdown(report: dict[str, Any], plot: str | None = None) -> str:
    s, tr, ev = report["student"], report["train"], report["eval"]
    headers, rows = comparison_columns(report)
    resumed = f" Resumed after epoch {tr['resumed_from_epoch']}." if tr.get("resumed_from_epoch") else ""
    lines = [
        "# compress: teacher vs student",
        "",
        f"Teacher `{report['teacher']['name']}`; student `{s.get('spec', '')}`: width {s['width']:,}, "
        f"rank {s['rank']} "
        f"(SNN-MIMIC, Ba & Caruana 2014). Evaluated on {ev['source']} ({ev['samples']:,} samples).",
        "",
        "| " + " | ".join(headers) + " |",
        "|---|" + "---:|" * (len(headers) - 1),
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
        f"Training: {tr['epochs']} epochs (best {tr['best_epoch']}) on {tr['samples']:,} transfer "
        f"samples in {tr['seconds']:.1f} s on {tr['device']}{STEP_NAMES.get(tr.get('engine'), '')} "
        f"({tr['samples_per_second']:,.0f} samples/s)." + resumed,
        *[f"Note: {note}" for note in tr.get("notes", [])],
        f"Export: `{Path(report['export']['path']).name}`, max |onnxruntime - torch| = "
        f"{report['export']['max_abs_diff']:.2e}.",
    ]
    for e in report.get("exports", []):
        lines.append(f"Export {e['precision']}: `{Path(e['path']).name}`, top-1 agreement with the fp32 "
                     f"student {100 * e['agreement_with_fp32']:.2f}% on held-out transfer inputs.")
    lines += ["", f"Latency: onnxruntime {report['latency_provider']}, median (p50) and 99th percentile "
              "of single calls after warm-up.", ""]
    if plot:
        lines += [f"![accuracy and latency against parameters]({plot})", ""]
    elif report.get("plot_missing"):
        lines += [f"(No plot: {report['plot_missing']})", ""]
    return "\n".join(lines)
