"""The card's own command at the paper's size, measured: `compress distill teacher.onnx --data x.npy
--width 400k --rank 250 --epochs 1` with D=1845 inputs, C=183 classes and 20,000 transfer samples
(174,061,433 student weights, the TIMIT SNN-MIMIC shape).

The teacher is a random two-layer MLP (1845 -> 512 -> 183) written with onnx.helper; the transfer data
standard normal. The distill runs in a child process, so that its peak resident memory (ru_maxrss of
that process alone) is the command's; the child records when each stage starts (the progress
callback) and the parent measures the CPU's fp32 matmul peak right before and after it (the best of
square multi-threaded products and one single-threaded product per core at once, as
benchmarks/train_throughput.py). MFU = 6 x weights x samples/s of the fit loop (its own step timer, the
report's `train.history[*].step_samples_per_second`) against the higher peak.

    python benchmarks/paper_size.py [--samples 20000] [--width 400k] [--epochs 1] [--batch-size 128]
Writes benchmarks/results/paper_size.{json,md} (paper_size_batch<N>.* for another --batch-size). The
child tunes malloc as the CLI does (compress.memory.keep_freed_memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402

D, C, HIDDEN = 1845, 183, 512


def teacher(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((D, HIDDEN)) / np.sqrt(D)).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, C)) / np.sqrt(HIDDEN) * 4).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["logits"])], "teacher",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", C])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))


def child(work: Path, width: str, epochs: int, batch: int) -> None:
    """The distill itself; prints one JSON line: stage start times, the report's figures, peak RSS."""
    import threading

    from compress.fit import FitConfig
    from compress.memory import keep_freed_memory
    from compress.pipeline import DistillOptions, distill
    from compress.student import parse_width

    stages: dict[str, float] = {}
    rss_before: dict[str, int] = {}  # the process's peak RSS so far, when each stage starts
    rss_max: dict[str, int] = {}  # the highest RSS sampled (every 50 ms) while each stage ran
    current = ["setup"]
    t0 = time.perf_counter()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            with open("/proc/self/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            rss_max[current[0]] = max(rss_max.get(current[0], 0), rss)

    threading.Thread(target=sample, daemon=True).start()

    def progress(stage: str, info: dict) -> None:
        if stage not in stages:
            stages[stage] = time.perf_counter() - t0
            rss_before[stage] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            current[0] = stage

    keep_freed_memory()  # as the CLI's process does
    opts = DistillOptions(width=parse_width(width), rank=250, out_dir=str(work / "run"),
                          fit=FitConfig(epochs=epochs, batch_size=batch), latency_budget_s=0.2)
    rep = distill([work / "teacher.onnx"], work / "x.npy", opts, progress=progress)
    stages["end"] = time.perf_counter() - t0
    done.set()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    files = {p.name: p.stat().st_size for p in sorted((work / "run").iterdir())}
    print(json.dumps({"stages": stages, "peak_rss_bytes": peak_kib * 1024, "rss_before": rss_before,
                      "rss_max": rss_max,
                      "files": files,
                      "weights": rep["student"]["params"], "engine": rep["train"]["engine"],
                      "batch": rep["train"].get("batch_size"), "threads": rep["train"].get("threads"),
                      "history": rep["train"]["history"], "fit_seconds": rep["train"]["seconds"],
                      "export_max_abs_diff": rep["export"]["max_abs_diff"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--width", default="400k")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128, help="distill's --batch-size (its default: 128)")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.width, args.epochs, args.batch_size)
        return
    import torch

    from benchmarks.train_throughput import matmul_peak, per_core_peak

    def peak() -> float:
        return max(matmul_peak("cpu"), per_core_peak(1024, 1.0))

    work = Path(tempfile.mkdtemp(prefix="paper-size-"))
    teacher(work / "teacher.onnx")
    np.save(work / "x.npy", np.random.default_rng(1).standard_normal((args.samples, D), dtype=np.float32))
    before = peak()
    p = subprocess.run([sys.executable, __file__, "--child", str(work), "--width", args.width, "--epochs",
                        str(args.epochs), "--batch-size", str(args.batch_size)],
                       capture_output=True, text=True, cwd=ROOT)
    after = peak()
    if p.returncode != 0:
        sys.exit(f"distill failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    sps = [h["step_samples_per_second"] for h in r["history"]]
    best_peak = max(before, after)
    width = (r["weights"] - D * 250 - C) // (250 + 1 + C)  # params = D*k + k*H + H + H*C + C
    macs = D * 250 + 250 * width + width * C
    stages = r["stages"]
    order = sorted(stages, key=stages.get)
    seconds = {s: round(stages[order[i + 1]] - stages[s], 2) for i, s in enumerate(order[:-1])}
    record = {"machine": machine(), "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": f"compress distill teacher.onnx --data x.npy --width {args.width} --rank 250 "
                         f"--epochs {args.epochs}"
                         + (f" --batch-size {args.batch_size}" if args.batch_size != 128 else ""),
              "D": D, "classes": C, "samples": args.samples, "width": width, "weights": r["weights"],
              "engine": r["engine"], "batch": r["batch"], "threads": r["threads"],
              "fit_loop_samples_per_second": sps, "flop_per_second": [6 * macs * s for s in sps],
              "peak_before": before, "peak_after": after,
              "mfu": [6 * macs * s / best_peak for s in sps], "peak_rss_bytes": r["peak_rss_bytes"],
              "seconds_per_stage": seconds, "files": r["files"],
              "peak_rss_before_stage_bytes": r["rss_before"], "rss_max_per_stage_bytes": r["rss_max"],
              "export_max_abs_diff": r["export_max_abs_diff"]}
    stem = "paper_size" + (f"_batch{args.batch_size}" if args.batch_size != 128 else "")
    lines = [f"# The paper-size distill on {record['machine']} ({record['when']})", "",
             f"`{record['command']}`: D={D}, C={C}, {args.samples:,} samples, {r['weights']:,} student "
             f"weights, engine {r['engine']}, batch {r['batch']}, {r['threads']} threads, torch "
             f"{torch.__version__}.", "",
             f"- fit loop: {', '.join(f'{s:,.0f}' for s in sps)} samples/s per epoch, "
             f"{', '.join(f'{m:.1%}' for m in record['mfu'])} of the fp32 matmul peak measured right before "
             f"and after ({before / 1e9:.0f} and {after / 1e9:.0f} GFLOP/s)",
             f"- peak resident memory of the distill process: {r['peak_rss_bytes'] / 2**30:.2f} GiB; peak "
             "so far when each stage started: "
             + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in r["rss_before"].items())
             + "; the highest RSS sampled every 50 ms during each stage: "
             + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in r["rss_max"].items()),
             "- seconds per stage: " + ", ".join(f"{k} {v}" for k, v in seconds.items()),
             "- files: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in r["files"].items())]
    write_results(stem, record, lines)


if __name__ == "__main__":
    main()
