"""`compress` commands. Each one parses options, calls the library, and renders the result.

Results go to stdout (`--json` prints only the report there); progress, tables and errors go to
stderr. A `CompressError` or a bad option prints one line and exits 2. Ctrl-C exits 130; during
training it also says how to continue.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from compress import jsonio
from compress.cli.failures import OneLineErrors, labelled_hint, newer, on_interrupt, resume_hint
from compress.cli.options import (
    EPOCHS,
    SECONDS,
    SEED,
    TEACHER_BATCH,
    RankType,
    SizeType,
    WidthType,
    check_student_spec,
    emit,
    export_options,
    fit_options,
    is_main_rank,
    parse_batch_sizes,
    parse_precisions,
    parse_students,
    teacher_options,
)
from compress.cli.render import ProgressView, console
from compress.memory import keep_freed_memory


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compress")
def cli() -> None:
    """Distill a trained classifier into a wide, shallow student and ship it as ONNX (SNN-MIMIC)."""
    keep_freed_memory()  # no page faults for each training step's activations (compress.memory)


def say_notes(report: dict[str, Any]) -> None:
    """What training changed from the request (a batch size that did not fit the GPU...), on stderr."""
    for note in report.get("train", {}).get("notes", []):
        click.echo(f"Note: {note}", err=True)


@cli.command()
@click.argument("teachers", nargs=-1, required=True, metavar="TEACHER [TEACHER...]")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Transfer inputs (.npy, .npz, .csv): unlabeled samples the teacher labels.")
@click.option("--eval-data", type=click.Path(path_type=Path),
              help="Evaluation inputs for the comparison [default: a held-out 10% of --data].")
@click.option("--eval-labels", type=click.Path(path_type=Path),
              help="Class labels for --eval-data, for accuracy.")
@click.option("--out", "out_dir", default="compress-out", show_default=True,
              type=click.Path(path_type=Path), help="Output folder.")
@teacher_options
@click.option("--key", default=None, help="Array name inside .npz files.")
@fit_options
@export_options(multiple=True)
@click.option("--augment", default=None, metavar="METHOD:FACTOR",
              help="Add synthetic transfer data, times FACTOR: munge, noise or mixup (e.g. munge:20); for "
                   "token-id teachers mask or ngram (e.g. ngram:5).")
@click.option("--memory-budget", type=SizeType(), default=None,
              help="Training data held in memory at most (e.g. 4G); larger transfer sets are streamed "
                   "from disk in blocks [default: a quarter of RAM].")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from --out/checkpoint.pt (saved after every epoch).")
@click.option("--bench-seconds", type=SECONDS, default=1.0, show_default=True,
              help="Latency timing budget per model and batch size.")
@click.option("--vocab-size", type=click.IntRange(1, 100_000_000), default=None,
              help="Token-id teachers: rows of the student's embedding table; ids at or above it count "
                   "as unknown tokens [default: the transfer data's largest id + 1].")
@click.option("--ngrams", type=click.IntRange(1, 3), default=1, show_default=True,
              help="Token-id teachers: add hashed n-grams up to this n (2 or 3) to the student's bag.")
@click.option("--buckets", type=click.IntRange(1, 10_000_000), default=None,
              help="Token-id teachers, --ngrams 2/3: rows of the n-gram hash table [default: 100,000].")
@click.option("--mask-id", type=click.IntRange(0, 2**62), default=None,
              help="Token-id teachers, --augment mask:F: the id that replaces tokens (the tokenizer's "
                   "[MASK] or [UNK]; 103 in BERT's WordPiece).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout, nothing else.")
def distill(teachers: tuple[Path, ...], data: Path, eval_data: Path | None, eval_labels: Path | None,
            out_dir: Path, output: str | None, arch: str | None, trust_pickle: bool, key: str | None,
            width: int, rank: int | None, student_spec: str | None, layout: str, epochs: int | None,
            batch_size: int, lr: float, loss: str, temperature: float, device: str, seed: int, engine: str,
            precision: str,
            min_agreement: float,
            quantize: str, augment: str | None, memory_budget: int | None, resume: bool,
            bench_seconds: float, vocab_size: int | None, ngrams: int, buckets: int | None,
            mask_id: int | None, as_json: bool) -> None:
    """Distill TEACHER (several: their ensemble) into a wide, shallow student.

    Writes student.onnx, student.pt, report.json and report.md into --out.
    """
    from compress.fit import FitConfig
    from compress.pipeline import DistillOptions
    from compress.pipeline import distill as run

    check_student_spec(click.get_current_context(), student_spec)
    opts = DistillOptions(
        width=width, rank=rank, student=student_spec, layout=layout, out_dir=str(out_dir), output=output,
        key=key,
        precisions=parse_precisions(precision), min_agreement=min_agreement, quantize=quantize,
        arch=arch, trust_pickle=trust_pickle, latency_budget_s=bench_seconds, augment=augment,
        memory_budget=memory_budget, resume=resume, vocab_size=vocab_size, mask_id=mask_id,
        ngrams=ngrams, buckets=buckets,
        fit=FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, loss=loss,
                      temperature=temperature, device=device, seed=seed, engine=engine),
    )
    with resume_hint(out_dir, out_dir / "targets.npy"), ProgressView(enabled=is_main_rank()) as view:
        report = run(list(teachers), data, opts, eval_data, eval_labels, progress=view.update)
    if report is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if report.get("reused"):
        click.echo(f"Note: {out_dir} holds this run, finished, with the same inputs and options: kept "
                   "(without --resume it runs again)", err=True)
    else:
        say_notes(report)
    emit(report, as_json)
    if not as_json:
        console.print(f"Wrote {out_dir}/student.onnx, student.pt, report.json, report.md")


@cli.command()
@click.argument("teachers", nargs=-1, required=True, metavar="TEACHER [TEACHER...]")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Transfer inputs.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="Where to write the logits (.npy).")
@teacher_options
@click.option("--key", default=None, help="Array name inside .npz files.")
@click.option("--batch-size", type=TEACHER_BATCH, default=1024, show_default=True, help="Teacher batch size.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the teacher runs.")
def targets(teachers: tuple[Path, ...], data: Path, out_path: Path, output: str | None,
            arch: str | None, trust_pickle: bool, key: str | None, batch_size: int,
            device: str) -> None:
    """Label the transfer data with the teacher's logits, once, into a .npy file."""
    from compress import data as data_mod
    from compress import distributed
    from compress.targets import cache_key, compute_targets, compute_targets_distributed
    from compress.teachers import load_teacher

    if out_path.suffix != ".npy":
        raise click.BadParameter(f"{out_path} must end in .npy", param_hint="--out")
    from compress.atomic import refuse_overwrite
    from compress.targets import cache_writes

    refuse_overwrite({"TEACHER": list(teachers), "--data": data}, cache_writes(out_path, "--out"))
    from compress.pipeline import check_device

    check_device(device)
    data_mod.check_key(key, data)
    teacher = load_teacher(list(teachers), output=output, device=device, arch=arch,
                           trust_pickle=trust_pickle)
    x = data_mod.open_inputs(data, teacher.signature.sample_shape, key=key,  # read chunk by chunk
                             inputs=teacher.signature.inputs, dtype=teacher.signature.input_dtype)
    key_ = cache_key(list(teachers), data, teacher.signature.output_name, x.shape[0])
    world = distributed.init()
    if world.size > 1:  # torchrun: each rank labels its shard, rank 0 writes
        z = compute_targets_distributed(teacher, x, out_path, key_, world, batch_size)
        distributed.finish(world)
        if not world.main:
            return
    else:
        with on_interrupt(lambda started: labelled_hint(out_path, started)), ProgressView() as view:
            z = compute_targets(teacher, x, out_path, key_, batch_size,
                                lambda done, n: view.update("targets", {"done": done, "total": n}))
    click.echo(f"{out_path}: {z.shape[0]} x {z.shape[1]} logits ({teacher.output_kind})")


@cli.command()
@click.argument("teachers", nargs=-1, required=True, metavar="TEACHER [TEACHER...]")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Transfer inputs.")
@click.option("--eval-data", type=click.Path(path_type=Path), help="Evaluation inputs.")
@click.option("--eval-labels", type=click.Path(path_type=Path), help="Labels for --eval-data.")
@click.option("--train-labels", type=click.Path(path_type=Path),
              help="Labels for --data: adds the same shallow nets trained on labels (the paper's baseline).")
@click.option("--widths", default="512,4k,16k", show_default=True, help="Comma-separated widths.")
@click.option("--ranks", default="0,32", show_default=True, help="Comma-separated ranks (0: none).")
@click.option("--students", default=None, metavar="SPEC,SPEC,...",
              help="Students in the paper's notation instead of the --widths x --ranks grid "
                   "(e.g. 32c5-p-4k,64L-8k).")
@click.option("--layout", type=click.Choice(["auto", "first", "last"]), default="auto", show_default=True,
              help="Where conv students find a sample's channels (as distill's --layout).")
@click.option("--out", "out_dir", default="compress-sweep", show_default=True,
              type=click.Path(path_type=Path), help="Output folder (one subfolder per student).")
@teacher_options
@click.option("--key", default=None, help="Array name inside .npz files.")
@click.option("--epochs", type=EPOCHS, default=None, help="Passes over the data [default: ~4,000 steps].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed.")
@click.option("--bench-seconds", type=SECONDS, default=0.2, show_default=True,
              help="Latency timing budget per model and batch size.")
@click.option("--resume", is_flag=True,
              help="Keep the students an interrupted sweep finished; continue the one it was training.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def sweep(teachers: tuple[Path, ...], data: Path, eval_data: Path | None, eval_labels: Path | None,
          train_labels: Path | None, widths: str, ranks: str, students: str | None, layout: str,
          out_dir: Path, output: str | None,
          arch: str | None, trust_pickle: bool, key: str | None, epochs: int | None, seed: int,
          bench_seconds: float, resume: bool, as_json: bool) -> None:
    """Distill one student per (width, rank) from one logit cache; table and accuracy-vs-parameters figure."""
    from compress.fit import FitConfig
    from compress.pipeline import DistillOptions
    from compress.sweep import render
    from compress.sweep import sweep as run

    def parse_list(text: str, kind: click.ParamType, hint: str) -> list[Any]:
        try:
            return [kind.convert(v.strip(), None, None) for v in text.split(",") if v.strip()]
        except click.BadParameter as e:
            raise click.BadParameter(e.message, param_hint=hint) from None

    specs = parse_students(click.get_current_context(), students)
    ws = parse_list(widths, WidthType(), "'--widths'")
    rs = [0 if r is None else r for r in parse_list(ranks, RankType(), "'--ranks'")]
    opts = DistillOptions(out_dir=str(out_dir), output=output, arch=arch, trust_pickle=trust_pickle,
                          key=key, fit=FitConfig(epochs=epochs, seed=seed), latency_budget_s=bench_seconds,
                          latency_batches=(1,), resume=resume, layout=layout)
    done = {"done": 0, "total": len(ws) * len(rs) + (len(ws) if train_labels else 0)}

    def hint(started: float) -> str | None:
        # A student's report may be on disk before its progress event arrives: count both ways
        finished = sum(newer(p, started) for p in [*out_dir.glob("w*_k*/report.json"),
                                                     *out_dir.glob("labels_*.json"),
                                                     *out_dir.glob("s_*/report.json")])
        n = max(done["done"], finished)
        if n or any(newer(ck, started) for ck in out_dir.glob("w*_k*/checkpoint.pt")):
            return (f"{n} of {done['total']} students are finished; the same command with "
                    "--resume keeps them and continues")
        return labelled_hint(out_dir / "targets.npy", started)

    with on_interrupt(hint), ProgressView() as view:
        def update(stage: str, info: dict[str, Any]) -> None:
            if stage == "sweep":
                done.update(info)
            view.update(stage, info)

        result = run(list(teachers), data, ws, rs, opts, eval_data, eval_labels, train_labels,
                     progress=update, students=specs)
    if as_json:
        click.echo(jsonio.dumps(result))
    else:
        console.print(render(result))
        console.print(f"Wrote {out_dir}/sweep.json, sweep.md, sweep.png")


@cli.command("fit")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Transfer inputs.")
@click.option("--targets", "targets_path", required=True, type=click.Path(path_type=Path),
              help="The teacher's logits for --data (.npy, from `compress targets`).")
@click.option("--out", "out_dir", default="compress-out", show_default=True,
              type=click.Path(path_type=Path), help="Output folder.")
@click.option("--key", default=None, help="Array name inside .npz files.")
@click.option("--input-name", default="input", show_default=True, help="Input name in student.onnx.")
@click.option("--output-name", default="logits", show_default=True, help="Output name in student.onnx.")
@fit_options
@click.option("--resume", is_flag=True, help="Continue an interrupted fit from --out/checkpoint.pt.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def fit_command(data: Path, targets_path: Path, out_dir: Path, key: str | None, input_name: str,
                output_name: str, width: int, rank: int | None, student_spec: str | None, layout: str,
                epochs: int | None, batch_size: int,
                lr: float, loss: str, temperature: float, device: str, seed: int, engine: str, resume: bool,
                as_json: bool) -> None:
    """Fit a student to logits computed earlier (compress targets): no teacher needed."""
    from compress.fit import FitConfig
    from compress.pipeline import DistillOptions
    from compress.refit import fit_targets

    check_student_spec(click.get_current_context(), student_spec)
    opts = DistillOptions(width=width, rank=rank, student=student_spec, layout=layout, out_dir=str(out_dir),
                          key=key, resume=resume,
                          fit=FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, loss=loss,
                                        temperature=temperature, device=device, seed=seed,
                                        engine=engine))
    with resume_hint(out_dir), ProgressView(enabled=is_main_rank()) as view:
        report = fit_targets(data, targets_path, opts, input_name, output_name, progress=view.update)
    if report is None:
        return
    say_notes(report)
    if as_json:
        click.echo(jsonio.dumps(report))
    else:
        t, f = report["train"], report["fidelity"]
        console.print(f"Student {report['student']['spec']} (width {report['student']['width']:,}, rank "
                      f"{report['student']['rank']}), "
                      f"{report['student']['params']:,} parameters: agreement {100 * f['agreement']:.2f}% "
                      f"with the targets on the held-out 10%; {t['epochs']} epochs in {t['seconds']:.1f} s "
                      f"({t['samples_per_second']:,.0f} samples/s). Wrote {out_dir}/student.onnx, "
                      "student.pt, report.json")


@cli.command()
@click.argument("student", type=click.Path(path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="The ONNX file to write.")
@click.option("--data", type=click.Path(path_type=Path),
              help="Held-out inputs to check the export on [default: those stored in student.pt].")
@export_options(multiple=False)
def export(student: Path, out_path: Path, data: Path | None, precision: str, min_agreement: float,
           quantize: str) -> None:
    """Export a student.pt to ONNX, checked before it is kept (fp32: against the torch student;
    fp16/int8: top-1 agreement with the fp32 export, at least --min-agreement)."""
    import numpy as np

    from compress import data as data_mod
    from compress.atomic import refuse_overwrite
    from compress.errors import ConfigError
    from compress.exporters.onnx import export_onnx, student_to_onnx
    from compress.exporters.quantize import export_precision, fp32_file, refuse_too_large
    from compress.student import load_student
    from compress.teachers import Signature

    precisions = parse_precisions(precision) or ("fp32",)
    if len(precisions) != 1:
        raise click.BadParameter(f"'{precision}': export writes one file; give one of fp32, fp16, int8",
                                 param_hint="'--precision'")
    (precision,) = precisions
    if out_path.is_dir():
        raise click.BadParameter(f"{out_path} is a folder; give the ONNX file's name", param_hint="'--out'")
    if quantize != "weights" and precision != "int8":
        raise click.BadParameter(f"{quantize} applies to --precision int8", param_hint="'--quantize'")
    name = out_path.name
    names = (name, f".{name}*", f"{name}.*.data")  # the file, its temporary folder, its weights file
    refuse_overwrite({"STUDENT": student, "--data": data},
                     [(f"--out {out_path}", out_path.parent, p) for p in names])
    model, cfg, meta = load_student(str(student))
    refuse_too_large(cfg, precision)
    try:
        sig = Signature.from_dict(meta["signature"])
        np.dtype(sig.input_dtype)
    except (TypeError, ValueError):
        raise ConfigError(f"STUDENT {student}: its teacher signature is not readable") from None
    if data is not None:
        x = data_mod.load_inputs(data, cfg.sample_shape, dtype=sig.input_dtype)
    elif "check_inputs" in meta:
        x = meta["check_inputs"]
    else:  # in the student's input type (uint8 pixels: whole numbers in its range)
        x = data_mod.random_inputs(256, cfg.sample_shape, sig.input_dtype)
    if precision == "fp32":
        res = export_onnx(model, cfg, sig, out_path, x)
        info = {"precision": "fp32", "path": res.path, "size_bytes": res.size_bytes,
                "max_abs_diff": res.max_abs_diff}
    else:
        with fp32_file(student_to_onnx(model, cfg, sig)) as fp32:
            info = export_precision(fp32, out_path, precision, x, min_agreement, quantize, x)
    click.echo(jsonio.dumps(info, indent=None))


@cli.command()
@click.argument("teacher", type=click.Path(path_type=Path))
@click.argument("student", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Inputs to compare on.")
@click.option("--labels", type=click.Path(path_type=Path), help="Class labels for --data, for accuracy.")
@teacher_options
@click.option("--key", default=None, help="Array name inside .npz files.")
@click.option("--batch-sizes", default="1,256", show_default=True, help="Latency batch sizes.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON on stdout.")
def compare(teacher: Path, student: Path, data: Path, labels: Path | None, output: str | None,
            arch: str | None, trust_pickle: bool, key: str | None, batch_sizes: str,
            as_json: bool) -> None:
    """Compare any two ONNX classifiers on the same inputs: a teacher and its student, or a student
    and its int8 export. Accuracy (with --labels), agreement, logit RMSE, size, latency."""
    from compress import data as data_mod
    from compress.errors import TeacherError
    from compress.evaluate import compare as run
    from compress.teachers import load_teacher

    batches = parse_batch_sizes(batch_sizes)
    data_mod.check_key(key, data)
    t = load_teacher([teacher], output=output, device="cpu", arch=arch, trust_pickle=trust_pickle)
    try:
        s = load_teacher([student], device="cpu")
    except TeacherError as e:  # the second model is the student: name it so
        msg = str(e)
        raise TeacherError("STUDENT" + msg[len("TEACHER"):] if msg.startswith("TEACHER") else msg) from None
    x = data_mod.load_inputs(data, t.signature.sample_shape, key=key, inputs=t.signature.inputs,
                             dtype=t.signature.input_dtype)
    y = data_mod.load_labels(labels, x.shape[0], what="--labels", data_what="--data") if labels else None
    report = run(t, s, x, y, batches=batches, labels_what=f"--labels {labels}")
    report["eval"]["source"] = f"--data {data.name}"
    report["latency_provider"] = "CPUExecutionProvider"
    emit(report, as_json)


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path),
                metavar="MODEL.onnx [MODEL.onnx...]")
@click.option("--batch-sizes", default="1,64,256", show_default=True, help="Comma-separated.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider.")
@click.option("--threads", type=click.IntRange(1, 4 * (os.cpu_count() or 1)), default=None,
              help="Intra-op threads, up to 4x the cores [default: onnxruntime's].")
@click.option("--seconds", type=SECONDS, default=1.0, show_default=True,
              help="Timing budget per model and batch size (after warm-up).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def bench(models: tuple[Path, ...], batch_sizes: str, provider: str, threads: int | None,
          seconds: float, as_json: bool) -> None:
    """Latency (p50/p90/p99) and throughput of ONNX models at several batch sizes."""
    from compress.bench import bench as run
    from compress.cli.render import print_bench

    result = run(list(models), parse_batch_sizes(batch_sizes), provider, threads, seconds)
    if as_json:
        click.echo(jsonio.dumps(result))
    else:
        print_bench(result)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@teacher_options
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON on stdout.")
def inspect(model: Path, output: str | None, arch: str | None, trust_pickle: bool,
            as_json: bool) -> None:
    """Describe a model: inputs, outputs (and whether they look like logits, probabilities or
    labels), parameters, format, and which output distill would use."""
    from compress.cli.render import print_description
    from compress.describe import describe

    info = describe(model, output=output, arch=arch, trust_pickle=trust_pickle)
    if as_json:
        click.echo(jsonio.dumps(info))
    else:
        print_description(info)


@cli.command()
@click.option("--out", "out_dir", default="compress-demo", show_default=True,
              type=click.Path(path_type=Path), help="Output folder.")
@click.option("--transfer", type=click.IntRange(1_000, 10_000_000), default=200_000, show_default=True,
              help="Fresh unlabeled MNIST-1D samples to generate as transfer data.")
@click.option("--width", type=WidthType(), default="4k", show_default=True,
              help="Student width (an MLP student, no bottleneck).")
@click.option("--student", "student_spec", default=None, metavar="SPEC",
              help="The student in the paper's notation instead, e.g. 32c5-32c5-p-64L-1k (a conv "
                   "student: 121k parameters, about the teacher's accuracy). Not with --width.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def demo(out_dir: Path, transfer: int, width: int, student_spec: str | None, as_json: bool) -> None:
    """Distill the built-in MNIST-1D CNN teacher on freshly generated transfer data."""
    from compress.demo import prepare
    from compress.fit import FitConfig
    from compress.pipeline import DistillOptions
    from compress.pipeline import distill as run
    from compress.plan import check_memory, student_config

    check_student_spec(click.get_current_context(), student_spec)
    # MNIST-1D: 40 inputs, 10 classes; a student that cannot train is refused before any data is made
    check_memory(student_config((40,), 10, width, 0, student_spec), FitConfig(), 40 * 4 * transfer,
                 spec=student_spec)
    console.print(f"Generating {transfer:,} MNIST-1D transfer samples and the 1,000-sample test set...")
    files = prepare(out_dir, transfer)
    opts = DistillOptions(width=width, rank=0, student=student_spec, out_dir=str(out_dir))
    with ProgressView() as view:
        report = run([files.teacher], files.transfer, opts, files.test_x, files.test_y,
                     progress=view.update)
    emit(report, as_json)
    if not as_json:
        console.print(f"Wrote {out_dir}/student.onnx, student.pt, report.json, report.md")


def main() -> None:
    cli(prog_name="compress")
