"""Exports side by side: size, accuracy and latency of fp32, fp16 and the three int8 methods, and how
stable the latency figures are (the same bench run twice, in one process, back to back).

Teacher: the bundled MNIST-1D CNN; student: width 4k, rank 20, distilled on 50,000 fresh samples; test
accuracy on the standard 1,000 test samples. Writes benchmarks/results/exports.{json,md}.

    python benchmarks/bench_exports.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_results  # noqa: E402
from compress.bench import bench
from compress.demo import mnist1d, prepare
from compress.exporters.quantize import export_precision
from compress.fit import FitConfig
from compress.pipeline import DistillOptions, distill
from compress.student import load_student
from compress.teachers import Signature


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-exports-"))
    files = prepare(work, 50_000)
    report = distill([files.teacher], files.transfer,
                     DistillOptions(width=4000, rank=20, out_dir=str(work / "run"), fit=FitConfig()),
                     files.test_x, files.test_y)
    _, cfg, meta = load_student(str(work / "run" / "student.pt"))
    sig = Signature(**{**meta["signature"], "sample_shape": tuple(meta["signature"]["sample_shape"])})
    test = mnist1d()
    check = meta["check_inputs"]
    calib = np.load(files.transfer, mmap_mode="r")[:512]
    variants = {"fp32": str(work / "run" / "student.onnx")}
    rows = []
    for name, precision, method in [("fp16", "fp16", "weights"), ("int8-weights", "int8", "weights"),
                                    ("int8-dynamic", "int8", "dynamic"), ("int8-static", "int8", "static")]:
        path = work / f"student.{name}.onnx"
        info = export_precision(variants["fp32"], path, precision, check,
                                min_agreement=0.0, method=method, calibration=calib)
        variants[name] = str(path)
        rows.append((name, info["agreement_with_fp32"]))
    agreement = dict(rows, fp32=1.0)
    runs = [bench(list(variants.values()), (1, 64, 256), "cpu", None, 1.0) for _ in range(2)]
    out = []
    for i, (name, path) in enumerate(variants.items()):
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits = sess.run(None, {sig.input_name: test["x_test"]})[0]
        lat = [r["models"][i]["latency_ms"] for r in runs]
        out.append({
            "variant": name, "size_bytes": Path(path).stat().st_size,
            "accuracy": float((logits.argmax(1) == test["y_test"]).mean()),
            "agreement_with_fp32": agreement[name],
            "latency_ms": lat[0],
            "p50_run2_over_run1": {b: lat[1][b]["p50"] / lat[0][b]["p50"] for b in lat[0]},
        })
    result = {"machine": machine(), "teacher_accuracy": report["teacher"]["accuracy"],
              "student": {"width": cfg.width, "rank": cfg.rank, "params": report["student"]["params"]},
              "variants": out}
    fp32 = out[0]["size_bytes"]
    lines = [f"# Exports of one student (width {cfg.width:,}, rank {cfg.rank}), MNIST-1D", "",
             f"Machine: {result['machine']}. Teacher test accuracy {100 * result['teacher_accuracy']:.1f}%.",
             "Latency: p50 ms per call, onnxruntime CPU, default threads; 'run 2 / run 1': the same bench "
             "repeated, batch 64.", "",
             "| variant | size | vs fp32 | test acc | agreement w/ fp32 | b1 p50 | b64 p50 | b256 p50 "
             "| run 2 / run 1 (b64) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in out:
        lat = v["latency_ms"]
        lines.append(f"| {v['variant']} | {v['size_bytes'] / 1e3:,.0f} kB | {v['size_bytes'] / fp32:.2f} | "
                     f"{100 * v['accuracy']:.1f}% | {100 * v['agreement_with_fp32']:.1f}% | "
                     f"{lat['1']['p50']:.3f} | {lat['64']['p50']:.3f} | {lat['256']['p50']:.3f} | "
                     f"{v['p50_run2_over_run1']['64']:.2f} |")
    write_results("exports", result, lines)


if __name__ == "__main__":
    main()
