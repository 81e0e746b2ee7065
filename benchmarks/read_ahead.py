"""Streamed training with and without reading the next block ahead (compress/feed.py).

A transfer set on disk as .npy memory maps (D=1845 inputs, C=183 logits, like the paper's TIMIT
features), fitted in blocks of --block rows, as `--memory-budget` does for data larger than memory.
Each configuration alternates read-ahead on and off --repeats times in one process and reports the
fit loop's samples/s (optimizer steps plus waiting for blocks, median over epochs) for each, and
their ratio per pair. The files are written once, so they are read from the page cache: this times
slicing and standardizing the rows, not the disk.

    python benchmarks/read_ahead.py [--rows 49152] [--block 8192] [--repeats 3]
Writes benchmarks/results/read_ahead.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_results  # noqa: E402
from compress.fit import FitConfig, fit  # noqa: E402
from compress.student import StudentConfig  # noqa: E402

D, C = 1845, 183


def write(work: Path, rows: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.lib.format.open_memmap(work / "x.npy", mode="w+", dtype=np.float32, shape=(rows, D))
    z = np.lib.format.open_memmap(work / "z.npy", mode="w+", dtype=np.float32, shape=(rows, C))
    rng = np.random.default_rng(0)
    for a in range(0, rows, 8192):
        b = min(rows, a + 8192)
        x[a:b] = rng.standard_normal((b - a, D), dtype=np.float32)
        z[a:b] = rng.standard_normal((b - a, C), dtype=np.float32)
    x.flush()
    z.flush()
    del x, z
    return np.load(work / "x.npy", mmap_mode="r"), np.load(work / "z.npy", mmap_mode="r")


def rate(x: np.ndarray, z: np.ndarray, cfg: StudentConfig, block: int, epochs: int, ahead: bool) -> float:
    res = fit(x, z, np.asarray(x[:256]), np.asarray(z[:256]), cfg, FitConfig(epochs=epochs, batch_size=256),
              stream_rows=block, read_ahead=ahead)
    return statistics.median(h["step_samples_per_second"] for h in res.history)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=49_152)
    ap.add_argument("--block", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    configs = [StudentConfig((D,), C, 8192, 250), StudentConfig((D,), C, 1024, 64)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="read-ahead-") as tmp:
        x, z = write(Path(tmp), args.rows)
        for cfg in configs:
            on, off = [], []
            for _ in range(args.repeats):
                off.append(rate(x, z, cfg, args.block, args.epochs, False))
                on.append(rate(x, z, cfg, args.block, args.epochs, True))
            rows.append({"width": cfg.width, "rank": cfg.rank, "ahead": on, "serial": off,
                         "ratio": [a / b for a, b in zip(on, off, strict=True)]})
            print(f"H={cfg.width} k={cfg.rank}: read ahead {statistics.median(on):,.0f} samples/s, "
                  f"serial {statistics.median(off):,.0f}; ratio per pair "
                  + ", ".join(f"{r:.3f}" for r in rows[-1]["ratio"]), flush=True)
    result = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rows": args.rows, "block_rows": args.block, "input_dim": D, "classes": C,
              "batch_size": 256, "epochs": args.epochs, "configs": rows}
    lines = ["# Streamed training: reading the next block ahead\n", f"Machine: {result['machine']}, "
             f"torch {result['torch']}, {result['threads']} threads. {args.rows:,} rows of D={D} inputs and "
             f"C={C} logits in .npy memory maps (page cache), blocks of {args.block:,} rows, batch 256, "
             f"{args.epochs} epochs a run, {args.repeats} runs each way, alternating.\n",
             "| width | rank | read ahead (samples/s) | serial (samples/s) | ratio per pair |",
             "|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['width']:,} | {r['rank']} | {statistics.median(r['ahead']):,.0f} | "
                     f"{statistics.median(r['serial']):,.0f} | "
                     + ", ".join(f"{v:.3f}" for v in r["ratio"]) + " |")
    write_results("read_ahead", result, lines, echo=False)


if __name__ == "__main__":
    main()
