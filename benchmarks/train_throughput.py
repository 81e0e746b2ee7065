"""Training throughput of the fit loop, as MFU against a matmul peak measured in the same run.

The peak: square matmuls (1024..3072 on CPU in fp32; 4096 and 8192 in bf16 on a GPU), each size run
back to back for about a second; the best size's sustained rate, measured before and after each run,
the higher of the two; on a CPU, also one single-threaded product per core at once (how the split
step uses the cores), whichever is faster. The first configuration runs --repeats times; the
report gives the spread.
The loop: `compress.fit.fit` itself on random data, timed by its per-epoch step timer (optimizer
steps only, no evaluation), median over the epochs after the first.
Paired MFU: between epochs (outside the step timer) a short peak probe runs, and each timed epoch is
also taken against the higher of the probes just before and after it, the median over epochs: on this
shared VM the load swings within seconds, so a whole run against peaks minutes apart mixes loads.
Achieved FLOP/s = 6 x weights x samples/s (forward + backward, the usual convention;
weights = D*k + k*H + H*C, or D*H + H*C with rank 0; for a conv student, the multiply-adds of one
forward pass, its convolutions' included).

Configurations: on CPU, D=1845, k=250, H=8k, C=183, batch 256 (the issue's), the same width with
rank 0 to show what the bottleneck buys, and the first again with `engine="autograd"` to show what
the split CPU step (compress/split_step.py) buys. On a GPU (when torch sees one): the paper-size
student, D=1845, k=250, H=400k, C=183, in bf16, and rank 0 at the same width. On both, the MNIST-1D
conv students CONV_STUDENTS at batch 256, with the default engine (compress/conv_step.py on a CPU, the
CUDA-graph step of compress/gpu_step.py on a GPU) and then autograd on the same student; on a GPU also
the paper-size student at distill's default batch, 128, and the 8k-wide one at 256, both ways.

    python benchmarks/train_throughput.py [--steps-per-epoch 40] [--epochs 6] [--repeats 5] [--conv-only]
Writes benchmarks/results/train_throughput_<device>.{json,md} (with --conv-only, the conv students
alone, every run: train_throughput_<device>_conv.{json,md}). malloc tuned as the CLI tunes it
(compress.memory.keep_freed_memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_results  # noqa: E402
from compress.fit import FitConfig, fit  # noqa: E402
from compress.memory import keep_freed_memory  # noqa: E402
from compress.student import StudentConfig, flops_per_sample, parse_spec  # noqa: E402

# the best one- and two-conv MNIST-1D students of benchmarks/results/conv_mnist1d_10000.md
CONV_STUDENTS = ("64c5-p-32L-2k", "32c5-p-64c5-p-64L-1k")
CORES = torch.get_num_threads()  # before any fit loop changes it
PROBE_SECONDS = 0.15  # each size's block in a peak probe between epochs (six blocks on a CPU)


def matmul_peak(device: str, seconds: float = 1.0) -> float:
    """Sustained square-matmul FLOP/s: for each size, repeated products timed as one block of about
    `seconds`; the best size's rate. A block, not the single fastest product, because the fit loop
    is timed over whole epochs too (the single fastest product on this shared VM runs ~10% above
    what any second-long stretch sustains)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sizes = (4096, 8192) if device == "cuda" else (1024, 2048, 3072)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.mm(a, b, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            for _ in range(4):
                torch.mm(a, b, out=out)
            reps += 4
            if device == "cuda":
                torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    if device == "cpu":  # also one single-threaded product per core at once, as the split step runs
        best = max(best, *(per_core_peak(n, seconds) for n in sizes))
    return best


def per_core_peak(n: int, seconds: float) -> float:
    """FLOP/s of one thread per core, each repeating single-threaded n x n products for `seconds`."""
    cores, done = torch.get_num_threads(), []

    def work() -> None:
        torch.set_num_threads(1)
        a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        torch.mm(a, b, out=out)
        start.wait()
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            torch.mm(a, b, out=out)
            reps += 1
        done.append(reps)

    start = threading.Barrier(cores + 1)
    threads = [threading.Thread(target=work) for _ in range(cores)]
    for th in threads:
        th.start()
    start.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    rate = 2 * n**3 * sum(done) / (time.perf_counter() - t)
    torch.set_num_threads(cores)
    return rate


def weights(cfg: StudentConfig) -> int:
    return flops_per_sample(cfg) // 2  # D*k + k*H + H*C (D*H + H*C at rank 0): the multiply-adds


def run(cfg: StudentConfig, batch: int, steps: int, epochs: int, device: str, engine: str) -> dict:
    """The fit loop's samples/s (median over the timed epochs); and, between epochs (fit's end-of-epoch
    report, outside its step timer, the step's threads idle), a short peak probe, so that each epoch's
    MFU is also taken against the peaks measured just before and just after it (`mfu_paired`: the
    median over epochs). On this shared VM the load swings within seconds; a whole run against peaks
    measured before and after it mixes minutes of different load, an epoch against its neighbours
    less so."""
    rng = np.random.default_rng(0)
    n = batch * steps
    x = rng.standard_normal((n, cfg.input_dim), dtype=np.float32)
    z = rng.standard_normal((n, cfg.num_classes), dtype=np.float32)
    probes: list[float] = []

    def between(report: dict) -> None:
        if "loss" in report:  # the end of an epoch; the split step leaves torch one thread: all of them
            threads = torch.get_num_threads()
            torch.set_num_threads(CORES)
            try:
                probes.append(matmul_peak(device, seconds=PROBE_SECONDS))
            finally:
                torch.set_num_threads(threads)

    res = fit(x, z, x[:batch], z[:batch], cfg,
              FitConfig(epochs=epochs, batch_size=batch, device=device, engine=engine), progress=between)
    per_epoch = [h["step_samples_per_second"] for h in res.history[1:]]
    sps = statistics.median(per_epoch)
    flop = 6 * weights(cfg)
    # epoch e (from 2) lies between the probes after epochs e-1 and e: probes[e-2] and probes[e-1]
    paired = [flop * r / max(probes[i], probes[i + 1]) for i, r in enumerate(per_epoch)]
    return {"spec": cfg.spec, "D": cfg.input_dim, "rank": cfg.rank, "width": cfg.width,
            "classes": cfg.num_classes,
            "batch": batch, "weights": weights(cfg), "engine": res.engine, "samples_per_second": sps,
            "samples_per_second_per_epoch": per_epoch, "flop_per_second": flop * sps,
            "epochs_timed": epochs - 1, "peak_probes": probes, "mfu_per_epoch_paired": paired,
            "mfu_paired": statistics.median(paired)}


def measured(cfg: StudentConfig, engine: str, batch: int, args: argparse.Namespace, device: str) -> dict:
    """One run between two peak measurements; MFU against the higher of the two."""
    before = matmul_peak(device)
    r = run(cfg, batch, args.steps_per_epoch, args.epochs, device, engine)
    after = matmul_peak(device)
    r.update(peak_before=before, peak_after=after, peak=max(before, after))
    r["mfu"] = r["flop_per_second"] / r["peak"]
    print(json.dumps({k: v for k, v in r.items() if k not in ("samples_per_second_per_epoch", "peak_probes",
                                                             "mfu_per_epoch_paired")}), flush=True)
    return r


def alternating(cfg: StudentConfig, engines: tuple[str, ...], batch: int, args: argparse.Namespace,
                device: str, times: int) -> dict[str, list[dict]]:
    """`times` runs of each engine, taking turns (a, b, a, b, ...)."""
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for _ in range(max(1, times)):
        for e in engines:
            runs[e].append(measured(cfg, e, batch, args, device))
    return runs


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["mfu"])[len(runs) // 2]


def ratios(runs: dict[str, list[dict]]) -> list[float]:
    """The default engine's samples/s over autograd's, pair by pair."""
    return [a["samples_per_second"] / b["samples_per_second"]
            for a, b in zip(runs["auto"], runs["autograd"], strict=True)]


TABLE_HEAD = ["| student | D | rank | width | classes | batch | multiply-adds | engine | samples/s | GFLOP/s "
              "| peak GFLOP/s | MFU | paired MFU |",
              "|---|---:|---:|---:|---:|---:|---:|:--|---:|---:|---:|---:|---:|"]


def row(r: dict) -> str:
    return (f"| `{r['spec']}` | {r['D']} | {r['rank']} | {r['width']:,} | {r['classes']} | {r['batch']} | "
            f"{r['weights']:,} | {r['engine']} | {r['samples_per_second']:,.0f} | "
            f"{r['flop_per_second'] / 1e9:,.0f} | {r['peak'] / 1e9:,.0f} | {100 * r['mfu']:.1f}% | "
            f"{100 * r['mfu_paired']:.1f}% |")


def conv_only(args: argparse.Namespace, device: str, name: str) -> None:
    """--conv-only: the conv students alone, each run beside one of autograd, --conv-repeats times;
    every run in the table. Writes train_throughput_<device>_conv.{json,md}."""
    result: dict = {"device": device, "device_name": name, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "students": {}}
    lines = [f"# Conv students' fit-loop throughput on {name}", "",
             f"torch {torch.__version__}, {result['threads']} threads, batch 256; MFU and paired MFU as in "
             f"train_throughput_{device}.md (`python benchmarks/train_throughput.py --conv-only`). Each "
             "run of the default step is followed by one of autograd on the same student.", "", *TABLE_HEAD]
    notes = []
    for spec in CONV_STUDENTS:
        front, rank, width = parse_spec(spec)
        cfg = StudentConfig((40,), 10, width, rank, front)
        tries = alternating(cfg, ("auto", "autograd"), 256, args, device, args.conv_repeats)
        result["students"][spec] = tries
        lines += [row(r) for pair in zip(tries["auto"], tries["autograd"], strict=True) for r in pair]
        mfu = [r["mfu"] for r in tries["auto"]]
        notes.append(f"`{spec}`, default step: MFU {', '.join(f'{100 * m:.1f}%' for m in mfu)} in run order "
                     f"(median {100 * statistics.median(mfu):.1f}%); {statistics.median(ratios(tries)):.2f}x "
                     "autograd (median of the pairs).")
    write_results(f"train_throughput_{device}_conv", result, [*lines, "", *notes])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps-per-epoch", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5, help="runs of the first configuration")
    ap.add_argument("--conv-repeats", type=int, default=3,
                    help="runs of each conv student, each engine, alternating (the table: the median runs)")
    ap.add_argument("--conv-only", action="store_true",
                    help="only the conv students (train_throughput_<device>_conv.{json,md})")
    args = ap.parse_args()
    keep_freed_memory()  # as the CLI runs the fit loop
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else machine()
    if args.conv_only:
        conv_only(args, device, name)
        return
    big = StudentConfig((1845,), 183, 400_000 if device == "cuda" else 8000, 250)
    rank0 = dataclasses.replace(big, rank=0)
    batch = 4096 if device == "cuda" else 256
    # On a CPU, each run of the default (split) step is followed by one of autograd on the same student:
    # each pair sees the same minute of this shared machine, and the gain is the median of the pairs'
    # ratios (one run of each, minutes apart, once measured 0.75x where four alternating pairs in one
    # process gave 1.12, 1.15, 1.16 and 0.97x)
    engines = ("auto", "autograd") if device == "cpu" else ("auto",)
    both = alternating(big, engines, batch, args, device, args.repeats)
    repeats = both["auto"]
    head = median_run(repeats)
    runs = [head, measured(rank0, "auto", batch, args, device)]
    gains: dict[str, list[float]] = {}  # student -> the default step's samples/s over autograd's, per pair
    if device == "cpu":  # what the split step buys over autograd on the same student
        runs.append(median_run(both["autograd"]))
        gains[big.spec] = ratios(both)
    if device == "cuda":  # distill's default batch, and the CPU's 8k student (~6 GFLOP a step, near
        # compress.gpu_step.GRAPH_MAX_FLOP_PER_STEP): the CUDA-graph step against eager autograd
        mid = dataclasses.replace(big, width=8000)
        for cfg, b, engine in ((big, 128, "graph"), (mid, 256, "auto")):
            runs += [measured(cfg, engine, b, args, device), measured(cfg, "autograd", b, args, device)]
            gains[f"{cfg.spec} at batch {b}"] = [runs[-2]["samples_per_second"]
                                                 / runs[-1]["samples_per_second"]]
    conv_mfus, conv_paired = {}, {}
    for spec in CONV_STUDENTS:  # MNIST-1D conv students, convolution FLOPs counted
        front, rank, width = parse_spec(spec)
        cfg = StudentConfig((40,), 10, width, rank, front)
        # on a shared 2-core machine one run of a few seconds swings by a third: the median of several,
        # each beside one of autograd (what compress.conv_step, or the CUDA-graph step, buys over it)
        tries = alternating(cfg, ("auto", "autograd"), 256, args, device, args.conv_repeats)
        conv_mfus[spec] = [r["mfu"] for r in tries["auto"]]
        conv_paired[spec] = [r["mfu_paired"] for r in tries["auto"]]
        runs += [median_run(tries["auto"]), median_run(tries["autograd"])]
        gains[spec] = ratios(tries)
    mfus = [r["mfu"] for r in repeats]
    speedup = runs[0]["samples_per_second"] / runs[1]["samples_per_second"]
    result = {"device": device, "device_name": name, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "peak_dtype": "bf16" if device == "cuda" else "fp32",
              "mfu_median": head["mfu"], "mfu_min": min(mfus), "mfu_max": max(mfus),
              "repeats": repeats, "runs": runs, "bottleneck_speedup_vs_rank0": speedup,
              "conv_mfu_runs": conv_mfus, "conv_mfu_paired_runs": conv_paired}
    lines = [f"# Fit-loop throughput on {name}", "",
             f"torch {torch.__version__}, {result['threads']} threads. Each run sits between two "
             f"{result['peak_dtype']} matmul peak measurements (square products, sustained over 1 s "
             "blocks) and its MFU = 6 x weights x samples/s is against the higher of the two; samples/s "
             f"is the median over {args.epochs - 1} timed epochs of {args.steps_per_epoch} steps. "
             "Paired MFU: each timed epoch against the higher of two short peak probes "
             f"({PROBE_SECONDS} s a size) taken just before and just after it, outside the step timer; "
             "the median over the epochs.", "",
             f"The first configuration, run {len(repeats)} times: MFU median {100 * head['mfu']:.1f}%, "
             f"min {100 * min(mfus):.1f}%, max {100 * max(mfus):.1f}% "
             f"({', '.join(f'{100 * m:.1f}%' for m in mfus)} in run order). The table shows its median run.",
             "", *TABLE_HEAD]
    lines += [row(r) for r in runs]
    lines += ["", f"The bottleneck (rank {runs[0]['rank']}) trains {speedup:.2f}x as many samples/s as "
              "rank 0 at the same width."]
    for spec, mfu in conv_mfus.items():
        lines.append(f"`{spec}`, default step, {len(mfu)} runs: MFU "
                     f"{', '.join(f'{100 * m:.1f}%' for m in mfu)} in run order (the table: the median); "
                     f"paired MFU {', '.join(f'{100 * m:.1f}%' for m in conv_paired[spec])}.")
    where = "compress/split_step.py and compress/conv_step.py" if device == "cpu" else "compress/gpu_step.py"
    result["engine_speedup_vs_autograd"] = {k: statistics.median(v) for k, v in gains.items()}
    result["engine_speedup_per_pair"] = gains
    if device == "cpu":
        result["split_speedup_vs_autograd"] = statistics.median(gains[big.spec])
    for spec, gain in gains.items():
        lines.append(f"`{spec}`: the default step ({where}) trains {statistics.median(gain):.2f}x as many "
                     f"samples/s as autograd (median of {len(gain)} pairs of runs back to back: "
                     f"{', '.join(f'{g:.2f}x' for g in gain)}).")
    write_results(f"train_throughput_{device}", result, lines)


if __name__ == "__main__":
    main()
