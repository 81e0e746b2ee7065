"""Teacher vs student: accuracy, fidelity, latency, and the report that puts them side by side."""

from __future__ import annotations

import time
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

    from compress.teachers import ort_providers

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=ort_providers(device))


def run_onnx(path: str | Path, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """The first output of an ONNX model with one input, over x in batches."""
    from compress.teachers import run_batched

    sess = onnx_session(path)
    inp = sess.get_inputs()[0]
    return run_batched(lambda b: sess.run(None, {inp.name: b})[0], x, batch_size)


def latency(sess: Any, sample: np.ndarray, batch_sizes: tuple[int, ...] = LATENCY_BATCHES,
            fixed_batch: int | None = None, budget_s: float = 1.0, min_runs: int = 20,
            max_runs: int = 2000) -> dict[str, dict[str, float]]:
    """p50/p99 milliseconds per `session.run` at each batch size, after warm-up.

    Each batch size runs for `budget_s` seconds (at least `min_runs`, at most `max_runs` timed runs).
    A model with a fixed batch size is timed at that size only.
    """
    inp = sess.get_inputs()[0]
    out: dict[str, dict[str, float]] = {}
    sizes = (fixed_batch,) if fixed_batch else batch_sizes
    for b in sizes:
        reps = int(np.ceil(b / sample.shape[0]))
        x = np.ascontiguousarray(np.concatenate([sample] * reps)[:b])
        feed = {inp.name: x}
        for _ in range(3):  # warm-up: allocations, thread pools, caches
            sess.run(None, feed)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
            t = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t) * 1e3)
        arr = np.array(times)
        out[str(b)] = {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)),
                       "runs": len(times), "samples_per_second": float(b / (arr.mean() / 1e3))}
    return out


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


def comparison_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, teacher, student) rows shared by the rich table and report.md."""
    t, s = report["teacher"], report["student"]
    rows = [
        ("parameters", _fmt(t["params"], "int"), _fmt(s["params"], "int")),
        ("file size", _fmt(t["size_bytes"], "bytes"), _fmt(s["size_bytes"], "bytes")),
        ("accuracy", _fmt(t["accuracy"], "pct"), _fmt(s["accuracy"], "pct")),
        ("agreement with teacher", "-", _fmt(report["fidelity"]["agreement"], "pct")),
        ("logit RMSE vs teacher", "-", f"{report['fidelity']['logit_rmse']:.4f}"),
    ]
    for b in sorted(set(t["latency_ms"]) | set(s["latency_ms"]), key=int):
        for q in ("p50", "p99"):
            rows.append((f"latency batch {b} {q}", _fmt(t["latency_ms"].get(b, {}).get(q), "ms"),
                         _fmt(s["latency_ms"].get(b, {}).get(q), "ms")))
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    s, tr, ev = report["student"], report["train"], report["eval"]
    lines = [
        "# compress: teacher vs student",
        "",
        f"Teacher `{report['teacher']['name']}`; student: width {s['width']:,}, rank {s['rank']} "
        f"(SNN-MIMIC, Ba & Caruana 2014). Evaluated on {ev['source']} ({ev['samples']:,} samples).",
        "",
        "| metric | teacher | student |",
        "|---|---:|---:|",
        *[f"| {m} | {a} | {b} |" for m, a, b in comparison_rows(report)],
        "",
        f"Training: {tr['epochs']} epochs (best {tr['best_epoch']}) on {tr['samples']:,} transfer "
        f"samples in {tr['seconds']:.1f} s on {tr['device']} ({tr['samples_per_second']:,.0f} "
        "samples/s).",
        f"Export: `{Path(report['export']['path']).name}`, max |onnxruntime - torch| = "
        f"{report['export']['max_abs_diff']:.2e}.",
        "",
        f"Latency: onnxruntime {report['latency_provider']}, median (p50) and 99th percentile of "
        "single `session.run` calls after warm-up.",
        "",
    ]
    return "\n".join(lines)
