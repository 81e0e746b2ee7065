"""What a larger batch buys and costs a wide student, measured in one run (issue 15: the paper-size
run's optimizer pass over 174M weights).

Speed: the fit loop (`compress.fit.fit` on random data, its own step timer, median over the timed
epochs) of the paper-size student (D=1845, k=250, H=400k, C=183: 174M weights) at batch 128 (distill's
default) and 512, each between two fp32 matmul peak measurements (benchmarks/train_throughput.py's);
MFU = 6 x weights x samples/s against the higher peak.
Accuracy: a wide MNIST-1D student (`64L-<--width>`, default 320k: 24M weights) taught by the bundled
CNN teacher on fresh transfer samples for the same epochs (the same samples seen) at batch 128 and lr
3e-3 (the defaults), at 512 and 3e-3 (a quarter of the steps), and at 512 and 1e-2; test accuracy on
the standard MNIST-1D test set and agreement with the teacher there. --epochs defaults to 13, a
quarter of distill's default length at 10,000 samples: a full-length run of this student takes ~10
minutes each on this CPU.

    python benchmarks/batch_by_width.py [--transfer 10000] [--width 320k] [--epochs 13] [--steps 6]
Writes benchmarks/results/batch_by_width.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_results  # noqa: E402
from benchmarks.train_throughput import matmul_peak  # noqa: E402
from compress.demo import mnist1d, teacher_path  # noqa: E402
from compress.evaluate import run_onnx  # noqa: E402
from compress.fit import FitConfig, fit  # noqa: E402
from compress.memory import keep_freed_memory  # noqa: E402
from compress.student import StudentConfig, count_params, format_width, parse_width  # noqa: E402


def speed(batch: int, steps: int) -> dict:
    cfg = StudentConfig((1845,), 183, 400_000, 250)
    rng = np.random.default_rng(0)
    n = batch * steps
    x = rng.standard_normal((n, 1845), dtype=np.float32)
    z = rng.standard_normal((n, 183), dtype=np.float32)
    before = matmul_peak("cpu")
    res = fit(x, z, x[:64], z[:64], cfg, FitConfig(epochs=3, batch_size=batch))
    after = matmul_peak("cpu")
    sps = statistics.median(h["step_samples_per_second"] for h in res.history[1:])
    w = count_params(cfg) - 400_000 - 183  # multiply-adds: D*k + k*H + H*C
    r = {"batch": batch, "engine": res.engine, "samples_per_second": sps, "peak": max(before, after),
         "mfu": 6 * w * sps / max(before, after)}
    print(json.dumps(r), flush=True)
    return r


def accuracy(batch: int, lr: float, epochs: int | None, width: int, x: np.ndarray, z: np.ndarray,
             test: dict) -> dict:
    cfg = StudentConfig((40,), 10, width, 64)
    n = len(x) - 1000
    t = time.perf_counter()
    res = fit(x[:n], z[:n], x[n:], z[n:], cfg, FitConfig(epochs=epochs, batch_size=batch, lr=lr))
    epochs = res.epochs
    with torch.no_grad():
        s = res.model(torch.from_numpy(test["x_test"])).numpy()
    r = {"batch": batch, "lr": lr, "epochs": epochs, "steps": epochs * -(-n // batch),
         "weights": count_params(cfg), "test_accuracy": float((s.argmax(1) == test["y_test"]).mean()),
         "agreement": float((s.argmax(1) == test["z_test"].argmax(1)).mean()),
         "best_val_loss": min(h["val_loss"] for h in res.history), "seconds": time.perf_counter() - t}
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--transfer", type=int, default=10_000)
    ap.add_argument("--width", default="320k", help="the accuracy runs' student: 64L-<width>")
    ap.add_argument("--epochs", type=int, default=13)
    ap.add_argument("--steps", type=int, default=6, help="steps per epoch of the speed runs (3 epochs)")
    args = ap.parse_args()
    keep_freed_memory()  # as the CLI runs the fit loop
    speeds = [speed(b, args.steps) for b in (128, 512)]
    x = mnist1d(args.transfer + 1000, 1234, train_split=1.0)["x"]
    z = run_onnx(teacher_path(), x)
    test = mnist1d()
    test["z_test"] = run_onnx(teacher_path(), test["x_test"])
    teacher_acc = float((test["z_test"].argmax(1) == test["y_test"]).mean())
    width = parse_width(args.width)
    accs = [accuracy(b, lr, args.epochs, width, x, z, test)
            for b, lr in ((128, 3e-3), (512, 3e-3), (512, 1e-2))]
    result = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "speed": speeds, "accuracy": accs, "teacher_accuracy": teacher_acc,
              "transfer": args.transfer, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    lines = [f"# Batch by width on {machine()} ({result['date']})", "",
             f"torch {torch.__version__}, {result['threads']} threads.", "",
             "Speed, the paper-size student (D=1845, k=250, H=400k, C=183), fit loop on random data, "
             f"{args.steps} steps an epoch, median of 2 timed epochs; MFU against the fp32 matmul peak "
             "measured before and after each run:", "",
             "| batch | engine | samples/s | peak GFLOP/s | MFU |", "|---:|:--|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['engine']} | {r['samples_per_second']:,.1f} | {r['peak'] / 1e9:,.0f} | "
              f"{100 * r['mfu']:.1f}% |" for r in speeds]
    lines += ["", f"Accuracy, MNIST-1D, student `64L-{format_width(width)}` ({accs[0]['weights']:,} weights) "
              f"taught by the bundled CNN ({100 * teacher_acc:.1f}% on the test set) on {args.transfer:,} "
              f"fresh transfer samples (+1,000 held out), {accs[0]['epochs']} epochs each (the same "
              "samples seen):", "",
              "| batch | lr | steps | test accuracy | agreement | best held-out loss | seconds |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['lr']:g} | {r['steps']:,} | {100 * r['test_accuracy']:.1f}% | "
              f"{100 * r['agreement']:.1f}% | {r['best_val_loss']:.4f} | {r['seconds']:.0f} |" for r in accs]
    write_results("batch_by_width", result, lines)


if __name__ == "__main__":
    main()
