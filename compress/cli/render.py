"""Rendering for the terminal: a rich progress display and the teacher-vs-student table, on stderr."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)

_LABELS = {"targets": "teacher", "targets ": "teacher+", "augment": "augment", "fit": "fit",
           "export": "export", "compare": "compare", "sweep": "sweep"}


def rate(per_second: float) -> str:
    """114 -> '114', 12,345 -> '12.3k', 2,500,000 -> '2.5M': three figures at most, never '0k'."""
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if round(per_second, -int(f"{per_second:e}".split("e")[1]) + 2) >= div:
            v = per_second / div
            return f"{v:.3g}{unit}" if v < 999.5 else f"{v:,.0f}{unit}"
    return f"{per_second:.3g}" if per_second < 100 else f"{per_second:.0f}"


class PlainProgress:
    """Progress as plain lines, for a stderr that is not a terminal: one when a stage starts, then at
    most one every `every_s` seconds per stage, plus one at each epoch's end and when a stage is done;
    each with the rate and the time left. `clock` is what tells the time (tests pass their own)."""

    def __init__(self, every_s: float = 10.0, clock: Any = None) -> None:
        import time

        self.every_s, self.clock = every_s, clock or time.monotonic
        self.started: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def say(self, text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)

    def update(self, stage: str, info: dict[str, Any]) -> None:
        now = self.clock()
        if "note" in info:
            self.say(f"Note: {info['note']}")
            return
        first = stage not in self.started
        self.started.setdefault(stage, now)
        if stage in ("targets", "augment", "sweep"):
            done, total = info["done"], info["total"]
            final = done >= total
            unit = "students" if stage == "sweep" else "rows"
            line = f"{_LABELS.get(stage, stage)}: {done:,}/{total:,} {unit}"
        elif stage == "fit":
            done, total = info["step"], info["steps"]
            final = "loss" in info  # an epoch's end
            line = (f"fit: epoch {info['epoch']}/{info['epochs']}, "
                    f"{rate(info['samples_per_second'])} samples/s")
            if final:
                loss = (f"residual {100 * info['residual']:.3g}% of logit var" if info.get("residual")
                        is not None else f"loss {info['loss']:.4g}")
                line += f", {loss}, agree {100 * info['agreement']:.1f}%"
        else:
            self.say(f"{stage}: started")
            return
        if not (first or final or now - self.last.get(stage, now) >= self.every_s):
            return
        self.last[stage] = now
        elapsed = now - self.started[stage]
        if 0 < done < total and elapsed > 0:
            line += f", {_duration(elapsed * (total - done) / done)} left"
        self.say(line)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressView:
    """Receives the library's (stage, details) callbacks and shows one bar per stage."""

    def __init__(self, enabled: bool = True) -> None:
        # stderr not a terminal (nohup, CI logs, `2> log`): plain lines instead of bars redrawn in place
        self.plain = PlainProgress() if enabled and not console.is_terminal else None
        enabled = enabled and self.plain is None
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
        if self.plain is not None:
            self.plain.update(stage, info)
            return
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
                     f"{rate(info['samples_per_second'])} samples/s"]
            if "loss" in info:
                loss = (f"residual {100 * info['residual']:.3g}% of logit var" if info.get("residual")
                        is not None else f"loss {info['loss']:.4g}")
                parts += [loss, f"agree {100 * info['agreement']:.1f}%"]
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
    if "spec" in s:  # the paper's notation says convolutions and the bag of tokens too
        shape = f" ({s['spec']}: width {s['width']:,}, rank {s['rank']})"
    else:
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
        if info.get("token_student"):
            console.print(f"text students: {info['token_student']}")
        if info.get("student_convolution"):
            console.print(f"conv students (--student 32c-p-256L-8k): {info['student_convolution']}")
    else:
        console.print(f"[red]not usable as a teacher[/red]: {info['why']}")
