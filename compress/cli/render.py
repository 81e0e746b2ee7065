"""Rendering for the terminal: a rich progress display and the teacher-vs-student table, on stderr."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)

_LABELS = {"targets": "teacher", "targets ": "teacher+", "augment": "augment", "fit": "fit",
           "export": "export", "compare": "compare", "sweep": "sweep"}


class ProgressView:
    """Receives the library's (stage, details) callbacks and shows one bar per stage."""

    def __init__(self, enabled: bool = True) -> None:
        self.progress = Progress(TextColumn("{task.description:<7}"), BarColumn(bar_width=24),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 console=console, transient=False, disable=not enabled)
        self.tasks: dict[str, TaskID] = {}
        self.totals: dict[str, int] = {}

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _task(self, stage: str, total: float | None) -> TaskID:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(_LABELS.get(stage, stage.capitalize()),
                                                       total=total, info="")
        return self.tasks[stage]

    def update(self, stage: str, info: dict[str, Any]) -> None:
        if "note" in info:  # something to read now, not in the final report
            self.progress.console.print(f"Note: {info['note']}", highlight=False)
        elif stage in ("targets", "augment", "sweep"):
            if self.totals.get(stage, info["total"]) != info["total"]:
                stage = f"{stage} "  # a second pass (the synthetic samples): a bar of its own
            self.totals.setdefault(stage, info["total"])
            t = self._task(stage, info["total"])
            self.progress.update(t, completed=info["done"], info=f"{info['done']:,}/{info['total']:,}")
        elif stage == "fit":
            t = self._task(stage, info["steps"])
            parts = [f"epoch {info['epoch']}/{info['epochs']}",
                     f"{info['samples_per_second'] / 1000:,.0f}k samples/s"]
            if "loss" in info:
                parts += [f"loss {info['loss']:.4g}", f"agree {100 * info['agreement']:.1f}%"]
                self.last_fit = ", ".join(parts)
            self.progress.update(t, completed=info["step"],
                                 info=", ".join(parts) if "loss" in info else
                                 getattr(self, "last_fit", parts[0]))
        else:
            t = self._task(stage, 1)
            self.progress.update(t, completed=1)


def print_table(report: dict[str, Any]) -> None:
    from compress.evaluate import comparison_columns

    s = report["student"]
    shape = f" (width {s['width']:,}, rank {s['rank']})" if "width" in s else ""
    table = Table(title=f"Teacher vs student{shape} on {report['eval']['source']}")
    headers, rows = comparison_columns(report)
    table.add_column(headers[0])
    for h in headers[1:]:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_bench(result: dict[str, Any]) -> None:
    table = Table(title=f"onnxruntime {result['provider']}, threads: {result['threads'] or 'default'}")
    for h in ("model", "size", "batch", "p50 ms", "p90 ms", "p99 ms", "samples/s", "timed"):
        table.add_column(h, justify="left" if h == "model" else "right")
    for m in result["models"]:
        for b, v in m["latency_ms"].items():
            table.add_row(m["model"], f"{m['size_bytes'] / 1e6:.2f} MB", b, f"{v['p50']:.3f}",
                          f"{v['p90']:.3f}", f"{v['p99']:.3f}", f"{v['samples_per_second']:,.0f}",
                          f"{v['runs']} x {v['method']}")
    console.print(table)


def print_description(info: dict[str, Any]) -> None:
    console.print(f"[bold]{info['path']}[/bold]: {info['format']}, {info['size_bytes']:,} bytes, "
                  f"{info['params']:,} parameters" if info.get("params") is not None else
                  f"[bold]{info['path']}[/bold]: {info['format']}, {info['size_bytes']:,} bytes")
    if info.get("opsets"):
        console.print(f"opsets {info['opsets']}, IR {info['ir_version']}, producer {info['producer']}")
    for title, rows in (("inputs", info.get("inputs")), ("outputs", info.get("outputs"))):
        if not rows:
            continue
        table = Table(title=title)
        for h in rows[0]:
            table.add_column(h)
        for r in rows:
            table.add_row(*[str(v) for v in r.values()])
        console.print(table)
    if info["usable"]:
        console.print(f"distill uses: {info['distill_uses']}")
    else:
        console.print(f"[red]not usable as a teacher[/red]: {info['why']}")
