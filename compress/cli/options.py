"""Option types and option groups shared by the commands. Parsing only: no library imports at load
time beyond what parsing needs, so `compress --help` stays fast."""

from __future__ import annotations

from typing import Any

import click

from compress import jsonio
from compress.cli.render import print_table


class WidthType(click.ParamType):
    """A width: 8000, 8k, 400k, 1.5M."""

    name = "width"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        from compress.student import parse_width

        try:
            return parse_width(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class SizeType(click.ParamType):
    """A size in bytes: 512M, 4G, 1.5G, 65536."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1:], 1)
        try:
            size = float(text[:-1] if mult > 1 else text) * mult
        except ValueError:
            self.fail(f"'{value}' is not a size; use e.g. 512M or 4G", param, ctx)
        if size < 1:
            self.fail(f"'{value}' must be positive", param, ctx)
        return int(size)


class RankType(click.ParamType):
    """A rank: a whole number >= 0, or 'auto'."""

    name = "rank"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() == "auto":
            return None
        try:
            k = int(str(value).strip())
        except ValueError:
            self.fail(f"'{value}' is not a rank; use a whole number >= 0 (0: no bottleneck) or auto",
                      param, ctx)
        if k < 0:
            self.fail(f"{k} is negative; use 0 for no bottleneck", param, ctx)
        return k


class Bounded(click.ParamType):
    """A finite float in [low, high] (either end open where asked): --lr, --temperature, seconds."""

    name = "number"

    def __init__(self, low: float, high: float, low_open: bool = False, why: str = "") -> None:
        self.low, self.high, self.low_open, self.why = low, high, low_open, why

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        import math

        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"'{value}' is not a number", param, ctx)
        bad = not math.isfinite(v) or v > self.high or (v <= self.low if self.low_open else v < self.low)
        if bad:
            side = ">" if self.low_open else ">="
            self.fail(f"{value} is out of range: must be finite, {side} {self.low:g} and <= {self.high:g}"
                      f"{self.why}", param, ctx)
        return v


# Bounds on whole-number options: beyond them a run cannot finish or a value cannot be meant
EPOCHS = click.IntRange(1, 100_000)
BATCH = click.IntRange(1, 2**31 - 1)
SEED = click.IntRange(0, 2**32 - 1)
TEACHER_BATCH = click.IntRange(1, 1_048_576)
MAX_LATENCY_BATCH = 65_536
SECONDS = Bounded(0.0, 3600.0, low_open=True)


def fit_options(f: Any) -> Any:
    from compress.fit import FitConfig

    d = FitConfig()
    opts = [
        click.option("--width", type=WidthType(), default="8k", show_default=True,
                     help="Hidden ReLU units H: 8000, 8k, 400k, 1.5M."),
        click.option("--rank", type=RankType(), default="auto", show_default=True,
                     help="Linear bottleneck k (0: none; auto: min(250, inputs/2))."),
        click.option("--student", "student_spec", default=None, metavar="SPEC",
                     help="The student in the paper's notation, input to output: 64c-p-1200L-30k "
                          "(conv, pooling, bottleneck, width), 250L-400k (= --width 400k --rank 250). "
                          "Not with --width/--rank."),
        click.option("--layout", type=click.Choice(["auto", "first", "last"]), default="auto",
                     show_default=True,
                     help="Where a conv student finds a sample's channels: first (C, H, W) / (C, L), last "
                          "(H, W, C) / (L, C) as Keras and TensorFlow models take them, or auto (last for "
                          "(H, W, C) images with 1, 3 or 4 channels, else first)."),
        click.option("--epochs", type=EPOCHS, default=None,
                     help="Passes over the transfer data [default: about 4,000 steps, 10..300]."),
        click.option("--batch-size", type=BATCH, default=d.batch_size, show_default=True,
                     help="Samples per optimizer step."),
        click.option("--lr", type=Bounded(0.0, 1.0, low_open=True), default=d.lr, show_default=True,
                     help="Peak Adam learning rate (3% warm-up, cosine decay)."),
        click.option("--loss", type=click.Choice(["l2", "kl"]), default=d.loss, show_default=True,
                     help="l2 on logits (the paper's) or kl with --temperature (Hinton 2015)."),
        click.option("--temperature", type=Bounded(0.1, 1000.0), default=d.temperature, show_default=True,
                     help="Softmax temperature for --loss kl."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True, help="Where to train; auto uses a GPU when there is one."),
        click.option("--seed", type=SEED, default=d.seed, show_default=True,
                     help="Seed for initialization, shuffling and the held-out split."),
        click.option("--engine", type=click.Choice(["auto", "split", "graph", "autograd"]), default=d.engine,
                     show_default=True, help="The training step: split (the CPU step of its own: an MLP "
                     "student's hidden units, or a conv student's batch, split across cores), graph (one "
                     "GPU: the whole step replayed as a CUDA graph), autograd, or auto (split on a CPU and "
                     "graph on a GPU where they pay)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def check_student_spec(ctx: click.Context, spec: str | None) -> None:
    """--student with --width or --rank: refused (two descriptions of one student); a malformed spec:
    refused here, before any model is loaded."""
    from click.core import ParameterSource

    if spec is None:
        return
    names = [name for name in ("width", "rank") if name in ctx.params]  # demo has no --rank
    for name in names:
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            given = "/".join(f"--{n}" for n in names)
            raise click.BadParameter(f"give the student either as --student {spec} or with {given}, "
                                     "not both", param_hint="'--student'")
    from compress.student import parse_spec

    parse_spec(spec)


def parse_students(ctx: click.Context, text: str | None) -> list[str] | None:
    """sweep's --students: specs in the paper's notation, each checked; not with --widths/--ranks."""
    from click.core import ParameterSource

    from compress.student import parse_spec

    if text is None:
        return None
    specs = [t.strip() for t in text.split(",") if t.strip()]
    if not specs:
        raise click.BadParameter("give at least one student, e.g. 32c5-p-4k", param_hint="'--students'")
    if any(ctx.get_parameter_source(n) != ParameterSource.DEFAULT for n in ("widths", "ranks")):
        raise click.BadParameter("give the students either as --students or as --widths/--ranks, not both",
                                 param_hint="'--students'")
    for spec in specs:
        parse_spec(spec)
    return specs


def export_options(multiple: bool) -> Any:
    def wrap(f: Any) -> Any:
        help_ = ("Extra exports besides fp32, comma-separated: fp16, int8 (student.<p>.onnx)."
                 if multiple else "Weight precision: fp32, fp16 (float32 interface kept) or int8.")
        opts = [
            click.option("--precision", default="" if multiple else "fp32",
                         show_default=not multiple, help=help_),
            click.option("--min-agreement", type=click.FloatRange(0.0, 1.0), default=0.99, show_default=True,
                         help="Refuse an fp16/int8 export whose top-1 agreement with the fp32 student "
                              "on held-out inputs falls below this."),
            click.option("--quantize", type=click.Choice(["weights", "dynamic", "static"]),
                         default="weights", show_default=True,
                         help="int8 method: weights (int8 storage, float math: most accurate), dynamic "
                              "or static (int8 math via onnxruntime; static calibrates on inputs)."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f
    return wrap


def parse_precisions(text: str) -> tuple[str, ...]:
    from compress.exporters.quantize import PRECISIONS

    out = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))  # once each
    for p in out:
        if p not in PRECISIONS:
            raise click.BadParameter(f"'{p}' is not one of {', '.join(PRECISIONS)}",
                                     param_hint="'--precision'")
    return out


def teacher_options(f: Any) -> Any:
    opts = [
        click.option("--output", default=None,
                     help="ONNX teacher output holding the scores [default: the first float one]."),
        click.option("--arch", default=None, metavar="MODULE:FACTORY",
                     help="For a state-dict teacher: a function returning the model (mypkg.nets:resnet)."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow a teacher saved as a whole pickled module. DANGEROUS: unpickling runs any "
                          "code the file holds; use only for files you trust."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def is_main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def emit(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(jsonio.dumps(report))
    else:
        print_table(report)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_LATENCY_BATCH:
        raise click.BadParameter(f"'{text}' is not a list of batch sizes like 1,64,256 (each 1 to "
                                 f"{MAX_LATENCY_BATCH:,})", param_hint="'--batch-sizes'")
    return sizes
