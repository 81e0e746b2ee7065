"""Convolutional students against MLP students on MNIST-1D (issue 14; Ba & Caruana 2014's
SNN-CNN-MIMIC, Urban et al. 2017's few-conv students), at matched parameter counts.

The bundled CNN teacher (93.8% on the standard test set) labels N freshly generated unlabeled
MNIST-1D samples; students of each family, all of at most ~150k parameters (plus, for reference, MLP
students up to ~1M), are distilled through the toolkit's API (`compress.pipeline.distill`) with the
same fixed step budget, and scored on the standard 1,000 test samples. Also recorded: each student's
training rate as MFU against the fp32 (CPU) or bf16 (GPU) matmul peak measured in the same run, with
the convolution FLOPs counted (`compress.student.flops_per_sample`).

    python benchmarks/conv_mnist1d.py [--transfer 10000] [--steps 2500]
Writes benchmarks/results/conv_mnist1d_<transfer>.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_results  # noqa: E402
from benchmarks.train_throughput import matmul_peak  # noqa: E402
from compress.demo import mnist1d, teacher_path  # noqa: E402
from compress.fit import FitConfig  # noqa: E402
from compress.pipeline import DistillOptions, distill  # noqa: E402
from compress.plan import student_config  # noqa: E402
from compress.student import flops_per_sample  # noqa: E402

STUDENTS = [  # (family, spec)
    ("MLP", "1k"), ("MLP", "2.5k"), ("MLP", "20L-4k"), ("MLP", "32L-3k"),
    ("SNN-CNN-MIMIC (1 conv)", "32c5-p-64L-1k"), ("SNN-CNN-MIMIC (1 conv)", "64c5-p-32L-2k"),
    ("Urban-style (2 conv)", "32c5-32c5-p-64L-1k"), ("Urban-style (2 conv)", "32c5-p-64c5-p-64L-1k"),
    ("MLP, up to 1M", "16k"), ("MLP, up to 1M", "32L-20k"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--transfer", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=2500, help="optimizer steps per student (batch 128)")
    ap.add_argument("--only", default=None, help="comma-separated specs to run (default: all)")
    args = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="conv-mnist1d-"))
    std = mnist1d()
    np.save(work / "test_x.npy", std["x_test"])
    np.save(work / "test_y.npy", std["y_test"])
    np.save(work / "transfer.npy", mnist1d(args.transfer, 2024, 1.0)["x"])  # fresh, unlabeled
    n_train = args.transfer - min(10_000, round(0.1 * args.transfer))
    epochs = max(1, math.ceil(args.steps * 128 / n_train))
    only = set(args.only.split(",")) if args.only else None
    rows, t_all = [], time.perf_counter()
    for family, spec in STUDENTS:
        if only and spec not in only:
            continue
        peak = matmul_peak(device)
        opts = DistillOptions(student=spec, out_dir=str(work / spec), cache_dir=str(work),
                              latency_budget_s=0.2, latency_batches=(1,),
                              fit=FitConfig(epochs=epochs, device=device))
        r = distill([teacher_path()], work / "transfer.npy", opts, work / "test_x.npy", work / "test_y.npy")
        assert r is not None
        cfg = student_config((40,), 10, 0, None, spec)
        rate = float(np.median([h["step_samples_per_second"] for h in r["train"]["history"][1:]] or
                               [r["train"]["samples_per_second"]]))
        mfu = 3 * flops_per_sample(cfg) * rate / peak
        rows.append({"family": family, "spec": r["student"]["spec"], "params": r["student"]["params"],
                     "accuracy": r["student"]["accuracy"], "agreement": r["fidelity"]["agreement"],
                     "teacher_accuracy": r["teacher"]["accuracy"], "epochs": epochs,
                     "samples_per_second": rate, "flop_per_sample_fwd": flops_per_sample(cfg),
                     "matmul_peak_flops": peak, "mfu": mfu, "engine": r["train"]["engine"],
                     "latency_ms_b1_p50": r["student"]["latency_ms"]["1"]["p50"],
                     "fit_seconds": r["train"]["seconds"]})
        print(f"{spec:>22} {rows[-1]['params']:>9,} params  acc {100 * rows[-1]['accuracy']:.1f}%  "
              f"{rate:,.0f} samples/s  MFU {100 * mfu:.1f}%", flush=True)
    out = {"machine": machine(), "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
           "transfer": args.transfer, "steps": args.steps, "epochs": epochs, "rows": rows,
           "seconds": time.perf_counter() - t_all, "when": time.strftime("%Y-%m-%d %H:%M")}
    small = [r for r in rows if r["params"] <= 150_000]
    best = {f: max((r["accuracy"] for r in small if r["family"].startswith(f)), default=None)
            for f in ("MLP", "SNN-CNN", "Urban")}
    out["best_at_most_150k"] = best
    out["best_mlp_up_to_1m"] = max((r["accuracy"] for r in rows if r["family"].startswith("MLP")
                                    and r["params"] <= 1_000_000), default=None)
    lines = [f"# Conv vs MLP students on MNIST-1D, {args.transfer:,} transfer samples", "",
             f"{out['machine']}; device {out['device']}; {epochs} epochs (~{args.steps} steps of 128) "
             f"each; teacher {100 * rows[0]['teacher_accuracy']:.1f}% on the standard test set. "
             f"{out['seconds']:.0f} s in all.", "",
             "| family | spec | params | test accuracy | agreement | samples/s | MFU | latency b1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['family']} | `{r['spec']}` | {r['params']:,} | {100 * r['accuracy']:.1f}% | "
              f"{100 * r['agreement']:.1f}% | {r['samples_per_second']:,.0f} | {100 * r['mfu']:.1f}% | "
              f"{r['latency_ms_b1_p50']:.3f} ms |" for r in rows]
    lines += ["", "Best of at most 150k parameters: " + ", ".join(
        f"{k} {100 * v:.1f}%" for k, v in best.items() if v is not None)]
    write_results(f"conv_mnist1d_{args.transfer}", out, lines)


if __name__ == "__main__":
    main()
