"""`compress sweep`: one student per (width, rank), all from one logit cache, and the paper's figure.

Ba & Caruana (2014), figures 2-3: accuracy against parameters on a log scale, the teacher as a
horizontal line, SNN-MIMIC students as one curve per rank and, when labels for the transfer data are
given, the same shallow nets trained on those labels (cross-entropy) as the curve to beat.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compress import jsonio
from compress.atomic import atomic_path, exclusive, refuse_overwrite
from compress.errors import ConfigError
from compress.pipeline import (
    DISTILL_WRITES,
    LOCK,
    DistillOptions,
    distill,
    holdout_split,
    out_writes,
)
from compress.plan import student_config, student_vocab

Progress = Callable[[str, dict[str, Any]], None]


def train_on_labels(data: str | Path, labels: str | Path, width: int, rank: int | None,
                    opts: DistillOptions, x_eval: np.ndarray | None, y_eval: np.ndarray | None,
                    spec: str | None = None, inputs: tuple[str, ...] = ()) -> dict[str, Any]:
    """The same student trained on the transfer data's labels: what shallow nets get without a teacher."""
    import torch

    from compress import data as data_mod
    from compress.fit import fit
    from compress.student import count_params

    x = data_mod.load_inputs(data, None, what="--data", key=opts.key, inputs=inputs)
    y = data_mod.load_labels(labels, len(x), what="--train-labels", data_what="--data")
    classes = int(max(y.max(), y_eval.max() if y_eval is not None else 0)) + 1
    onehot = np.eye(classes, dtype=np.float32)[y]
    train_idx, val_idx = holdout_split(len(x), opts.fit.seed)
    if inputs and not rank:  # a text student always has its bag: the grid's rank-0 baseline gets the default
        rank = None
    cfg = student_config(tuple(int(v) for v in x.shape[1:]), classes, width, rank, spec,
                         student_vocab(x, inputs, opts), inputs, opts.ngrams, opts.buckets, opts.layout)
    res = fit(x[train_idx], onehot[train_idx], x[val_idx], onehot[val_idx], cfg,
              dataclasses.replace(opts.fit, loss="ce"))
    acc = None
    if x_eval is not None and y_eval is not None:
        with torch.no_grad():
            s = res.model(torch.from_numpy(np.array(x_eval))).numpy()  # a copy: x_eval is read-only
        acc = float((s.argmax(1) == y_eval).mean())
    return {"kind": "labels", "width": cfg.width, "rank": cfg.rank, "spec": cfg.spec,
            "params": count_params(cfg), "accuracy": acc, "fit_seconds": res.seconds}


def labels_record(data: str | Path, labels: str | Path, width: int, opts: DistillOptions,
                  eval_data: str | Path | None, eval_labels: str | Path | None,
                  spec: str | None = None) -> dict[str, Any]:
    """What a trained-on-labels row depends on (files by path, size and modification time)."""
    from compress.targets import data_key

    return json.loads(json.dumps({
        "data": data_key(data), "labels": data_key(labels), "width": width, "key": opts.key,
        **({"spec": spec} if spec is not None else {}),
        "fit": dataclasses.asdict(opts.fit),
        "eval": [data_key(p) if p is not None else None for p in (eval_data, eval_labels)]}))


def _reuse(path: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved["row"] if isinstance(saved, dict) and saved.get("run") == record else None


Student = tuple[str, int, int, "str | None"]  # (folder name, width, rank, spec)


def plan(widths: list[int], ranks: list[int], students: list[str] | None) -> list[Student]:
    """The students of a sweep: every (width, rank), or the specs given (`--students`)."""
    from compress.student import parse_spec

    if students:
        out = []
        for spec in students:
            _, rank, width = parse_spec(spec)
            out.append((f"s_{spec}", width, rank, spec))
        return out
    if not widths or not ranks:
        raise ConfigError("--widths/--ranks: give at least one of each")
    return [(f"w{w}_k{k}", w, k, None) for w in widths for k in ranks]


def sweep(teachers: list[str | Path], data: str | Path, widths: list[int], ranks: list[int],
          opts: DistillOptions, eval_data: str | Path | None = None, eval_labels: str | Path | None = None,
          train_labels: str | Path | None = None, progress: Progress | None = None,
          students: list[str] | None = None) -> dict[str, Any]:
    """Distill every (width, rank) into out_dir/w<width>_k<rank>/ (or every spec of `students`, the
    paper's notation, into out_dir/s_<spec>/), write sweep.json/.md and sweep.png.

    With `opts.resume`, students that finished with the same inputs and options are kept (their rows
    say "reused"), the one that was interrupted continues from its checkpoint, and trained-on-labels
    rows are kept likewise (out_dir/labels_w<width>.json, labels_s_<spec>.json)."""

    todo = plan(widths, ranks, students)
    out = Path(opts.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    writes = out_writes("--out", out, (*DISTILL_WRITES, "sweep.*", "labels_*.json"))
    for name, *_ in todo:
        writes += out_writes("--out", out / name, DISTILL_WRITES)
    refuse_overwrite({"TEACHER": list(teachers), "--data": data, "--eval-data": eval_data,
                      "--eval-labels": eval_labels, "--train-labels": train_labels}, writes)
    inputs = _check_upfront(teachers, data, todo, opts, eval_data, eval_labels, train_labels)
    with exclusive(out / LOCK, f"--out {out}"):  # the students' folders and their shared logit cache
        return _sweep(teachers, data, todo, opts, eval_data, eval_labels, train_labels, progress, inputs)


def _check_upfront(teachers: list[str | Path], data: str | Path, todo: list[Student], opts: DistillOptions,
                   eval_data: str | Path | None, eval_labels: str | Path | None,
                   train_labels: str | Path | None) -> tuple[str, ...]:
    """The teacher's token inputs (empty for float inputs), after checking what would otherwise fail
    after the first student: a student that does not fit the input (a
    rank wider than it, pooling below 1), or memory, and --train-labels that do not fit the data or
    the teacher's classes."""
    from compress import data as data_mod
    from compress.pipeline import check_device
    from compress.plan import check_memory
    from compress.teachers import load_teacher

    opts.fit.validate()
    check_device(opts.fit.device)
    if eval_labels is not None and eval_data is None:
        raise ConfigError("--eval-labels: needs --eval-data (the inputs those labels belong to)")
    teacher = load_teacher(list(teachers), output=opts.output, device="cpu", arch=opts.arch,
                           trust_pickle=opts.trust_pickle)
    inputs = teacher.signature.inputs
    x = data_mod.open_inputs(data, teacher.signature.sample_shape, what="--data", key=opts.key, inputs=inputs,
                             dtype=teacher.signature.input_dtype)
    shape = tuple(int(v) for v in x.shape[1:])
    classes = teacher.logits(np.asarray(x[0:1], dtype=teacher.signature.data_dtype)).shape[1]
    vocab = student_vocab(x, inputs, opts)
    for _, w, k, spec in todo:
        try:
            cfg = student_config(shape, classes, w, k, spec, vocab, inputs, opts.ngrams, opts.buckets,
                                 opts.layout)
        except ConfigError as e:
            raise ConfigError(str(e).replace("--rank:", "--ranks:", 1)) from None
        check_memory(cfg, opts.fit, 0, option="--students" if spec else "--widths", spec=spec)
    if train_labels is not None:
        y = data_mod.load_labels(train_labels, len(x), what="--train-labels", data_what="--data")
        if int(y.max()) >= classes:
            raise ConfigError(f"--train-labels {train_labels}: has class {int(y.max())} but the teacher "
                              f"gives {classes} classes")
    return inputs


def _sweep(teachers: list[str | Path], data: str | Path, todo: list[Student], opts: DistillOptions,
           eval_data: str | Path | None, eval_labels: str | Path | None,
           train_labels: str | Path | None, progress: Progress | None,
           inputs: tuple[str, ...] = ()) -> dict[str, Any]:
    """sweep(), with its folder locked (`inputs`: a token-id teacher's)."""
    from compress import data as data_mod

    out = Path(opts.out_dir)
    rows: list[dict[str, Any]] = []
    teacher: dict[str, Any] = {}
    # on labels: one per width of the grid (no bottleneck, the paper's baseline), or one per spec
    on_labels = ([(f"s_{spec}", w, k, spec) for _, w, k, spec in todo] if todo[0][3] is not None
                 else [(f"w{w}", w, 0, None) for w in dict.fromkeys(w for _, w, _, _ in todo)])
    total = len(todo) + (len(on_labels) if train_labels is not None else 0)
    for name, w, k, spec in todo:
        sub = out / name
        # --resume per student only where it left something: elsewhere it would note "no checkpoint"
        resume = opts.resume and ((sub / "report.json").exists() or (sub / "checkpoint.pt").exists())
        run = dataclasses.replace(opts, width=w, rank=k, student=spec, out_dir=str(sub), cache_dir=str(out),
                                  resume=resume)
        r = distill(teachers, data, run, eval_data, eval_labels, progress=progress)
        assert r is not None  # sweep runs in one process
        teacher = r["teacher"]
        lat = r["student"]["latency_ms"]
        rows.append({"kind": "mimic", "width": w, "rank": k, "spec": r["student"]["spec"],
                     "params": r["student"]["params"],
                     "accuracy": r["student"]["accuracy"], "agreement": r["fidelity"]["agreement"],
                     "latency_ms_batch1_p50": lat.get("1", {}).get("p50"),
                     "fit_seconds": r["train"]["seconds"], "path": r["export"]["path"],
                     "reused": bool(r.get("reused"))})
        if progress:
            progress("sweep", {"done": len(rows), "total": total})
    if train_labels is not None:
        x_eval = y_eval = None
        if eval_data is not None and eval_labels is not None:
            x_eval = data_mod.load_inputs(eval_data, None, what="--eval-data", key=opts.key, inputs=inputs)
            y_eval = data_mod.load_labels(eval_labels, len(x_eval))
        for name, w, k, spec in on_labels:
            path = out / f"labels_{name}.json"
            record = labels_record(data, train_labels, w, opts, eval_data, eval_labels, spec)
            row = _reuse(path, record) if opts.resume else None
            if row is None:
                row = train_on_labels(data, train_labels, w, k, opts, x_eval, y_eval, spec, inputs)
                with atomic_path(path) as tmp:
                    Path(tmp).write_text(jsonio.dumps({"run": record, "row": row}) + "\n")
                row["reused"] = False
            else:
                row["reused"] = True
            rows.append(row)
            if progress:
                progress("sweep", {"done": len(rows), "total": total})
    result = {"teacher": {"name": teacher.get("name"), "params": teacher.get("params"),
                          "accuracy": teacher.get("accuracy")}, "runs": rows}
    with atomic_path(out / "sweep.json") as tmp:
        Path(tmp).write_text(jsonio.dumps(result) + "\n")
    with atomic_path(out / "sweep.md") as tmp:
        Path(tmp).write_text(render(result))
    try:
        plot_sweep(result, out / "sweep.png")
        result["figure"] = str(out / "sweep.png")
    except ImportError:
        result["figure"] = None
    return result


def render(result: dict[str, Any]) -> str:
    t = result["teacher"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    params = f"{t['params']:,}" if t.get("params") is not None else "?"
    lines = [f"# Sweep: teacher `{t['name']}`, {params} parameters, accuracy {pct(t['accuracy'])}",
             "", "| student | spec | width | rank | params | accuracy | agreement | latency b1 p50 | fit s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lat = r.get("latency_ms_batch1_p50")
        lines.append(f"| {'mimic (SNN-MIMIC)' if r['kind'] == 'mimic' else 'trained on labels'} | "
                     f"{r.get('spec', '-')} | {r['width']:,} | {r['rank']} | {r['params']:,} | "
                     f"{pct(r['accuracy'])} | "
                     f"{pct(r.get('agreement'))} | {'-' if lat is None else f'{lat:.3f} ms'} | "
                     f"{r['fit_seconds']:.1f} |")
    return "\n".join(lines) + "\n\n![accuracy against parameters](sweep.png)\n"


def series(result: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Curve name -> [(params, accuracy or agreement)], sorted by params."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in result["runs"]:
        score = r["accuracy"] if r["accuracy"] is not None else r.get("agreement")
        if score is None:
            continue
        convs = str(r.get("spec", "")).count("c")
        if convs:  # a series per family: one conv layer (SNN-CNN-MIMIC), or several (Urban et al.)
            family = "SNN-CNN-MIMIC" if convs == 1 else f"{convs}-conv MIMIC"
            name = family if r["kind"] == "mimic" else f"{family} shape on labels"
        else:
            name = (f"SNN-MIMIC, rank {r['rank']}" if r["rank"] else "SNN-MIMIC, no bottleneck") \
                if r["kind"] == "mimic" else "shallow net on labels"
        curves.setdefault(name, []).append((r["params"], score))
    return {k: sorted(v) for k, v in curves.items()}


def plot_sweep(result: dict[str, Any], path: str | Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = series(result)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        ax.plot([p for p, _ in pts], [100 * a for _, a in pts], marker="o" if "MIMIC" in name else "s",
                linestyle="-" if "MIMIC" in name else "--", label=name)
    t = result["teacher"]
    if t.get("accuracy") is not None:
        ax.axhline(100 * t["accuracy"], color="k", linestyle=":", label=f"teacher {t['name']}")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel("test accuracy (%)" if t.get("accuracy") is not None else "agreement with teacher (%)")
    ax.set_title("accuracy against parameters (Ba & Caruana 2014, fig. 2)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return list(curves) + (["teacher"] if t.get("accuracy") is not None else [])
