"""Where one GPU training step of the paper-size student goes, and what a few changes buy.

The fit loop's own step (fp32 weights, bf16 autocast, fused AdamW, in-place ReLU, L2 on the logits)
for the paper-size student (D=1845, k=250, H=400k, C=183 padded to 192), timed by the wall clock
(synchronized) over `--steps` steps after a warm-up, and profiled (torch.profiler) into GPU kernel
time per kind: matrix products, the optimizer, and the element-wise rest (ReLU and its gradient,
autocast's casts, the loss).
MFU = 6 x weights x samples/s against the bf16 matmul peak measured in the same run.

Variants, each timed the same way:
- `rank 250`: the step with the real rank, as compress.fit ran it before it padded the rank;
- `fit loop`: the step as compress.fit runs it on a GPU, the rank padded to a multiple of
  compress.gpu_step.RANK_ALIGN (256), at batch 4096 and 8192, and at 128 (distill's default) and 512;
- `fused ReLU`: that, with the hidden layer as one cuBLASLt product with its bias and ReLU in the
  epilogue (torch._addmm_activation), its gradient from the saved output (one element-wise pass fewer);
- `torch.compile`: the fit loop's model compiled (default mode), when it compiles here;
- `CUDA graph` (GPU only): the step replayed as one CUDA graph (compress.gpu_step.GraphStep), at batch
  128 and 4096, to see why the fit loop ran the paper-size student 0.85x as fast that way at 128.

    python benchmarks/gpu_step_profile.py [--steps 20] [--width 400000]
Writes benchmarks/results/gpu_step_profile.{json,md}, rewritten after each variant. On a machine
without a GPU it runs on the CPU at a small size (a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, write_results  # noqa: E402
from compress.gpu_step import RANK_ALIGN, GraphStep  # noqa: E402
from compress.student import StudentConfig, build_student, count_params  # noqa: E402


def peak(device: torch.device) -> float:
    """Sustained square-matmul FLOP/s (bf16 on a GPU, fp32 on a CPU), the best of two sizes."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    best = 0.0
    for n in ((4096, 8192) if device.type == "cuda" else (512,)):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        for _ in range(3):
            a @ b
        sync(device)
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < 1.0:
            for _ in range(10):
                a @ b
            sync(device)
            reps += 10
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class FusedLinearReLU(torch.autograd.Function):
    """relu(x @ w.T + bias) as one cuBLASLt product with the bias and ReLU in its epilogue; the
    backward pass masks the incoming gradient with the saved output."""

    @staticmethod
    def forward(ctx, x, w, bias):  # type: ignore[override]
        h = torch._addmm_activation(bias, x, w.t(), use_gelu=False)
        ctx.save_for_backward(x, w, h)
        return h

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, w, h = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(g, h, 0)
        return g @ w, g.t() @ x, g.sum(0)


def fused_forward(model: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    dt = torch.bfloat16 if x.is_cuda else torch.float32
    b = x.to(dt) @ model.bottleneck.weight.to(dt).t()
    h = FusedLinearReLU.apply(b, model.hidden.weight.to(dt), model.hidden.bias.to(dt))
    return h @ model.out.weight.to(dt).t() + model.out.bias.to(dt)


def variant(name: str, device: torch.device, cfg: StudentConfig, batch: int, steps: int,
            mode: str, rank: int) -> dict:
    torch.manual_seed(0)
    weights = count_params(cfg)  # the real student's: padding units do no useful work
    cfg = dataclasses.replace(cfg, rank=rank)
    model = build_student(cfg).to(device)
    model.relu.inplace = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    net = torch.compile(model) if mode == "compile" else model
    x = torch.randn(batch, cfg.input_dim, device=device)
    z = torch.randn(batch, cfg.num_classes, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            s = fused_forward(model, x) if mode == "fused" else net(x)
            loss = 0.5 * (s.float() - z).pow(2).sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if mode == "graph":  # the same step as compress.fit's CUDA-graph engine replays it
        graphed = GraphStep(model, opt, lambda s, t: 0.5 * (s - t).pow(2).sum(dim=1).mean(),
                            slice(0, cfg.num_classes), batch, autocast)
        rows = torch.arange(batch, device=device)

        def step() -> None:
            graphed.step(x, z, rows)

    t = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync(device)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    per_step = (time.perf_counter() - t) / steps
    kinds: dict[str, float] = collections.defaultdict(float)
    top: dict[str, float] = collections.defaultdict(float)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    prof_steps = 5
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(prof_steps):
            step()
        sync(device)
    for e in prof.events():
        if device.type == "cuda" and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = (getattr(e, "device_time", 0.0) if device.type == "cuda" else e.self_cpu_time_total)
        top[e.name[:90]] += us / prof_steps / 1e3
        low = e.name.lower()
        kind = ("matmul" if any(s in low for s in ("gemm", "nvjet", "cutlass", "sm90", "mm", "matmul"))
                else "optimizer" if "adam" in low
                else "element-wise")
        kinds[kind] += us / prof_steps / 1e3
    return {"variant": name, "batch": batch, "trained_rank": rank, "weights": weights,
            "step_ms": per_step * 1e3,
            "warmup_s": warm_s, "samples_per_second": batch / per_step,
            "flop_per_second": 6 * weights * batch / per_step,
            "kernel_ms_by_kind": dict(kinds),
            "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:10]),
            "max_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                               if device.type == "cuda" else None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=None, help="default: 400k on a GPU, 2k on a CPU")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    width = args.width or (400_000 if cuda else 2_000)
    cfg = StudentConfig((1845,), 192, width, 250)
    batches = (4096, 8192) if cuda else (64, 128)
    small = (128, 512) if cuda else (16, 32)  # 128: distill's default --batch-size
    padded = -(-cfg.rank // RANK_ALIGN) * RANK_ALIGN
    plan = [("rank 250", batches[0], "plain", cfg.rank), ("rank 250", batches[1], "plain", cfg.rank),
            ("fit loop", batches[0], "plain", padded), ("fit loop", batches[1], "plain", padded),
            ("fit loop", small[0], "plain", padded), ("fit loop", small[1], "plain", padded),
            ("fused ReLU", batches[0], "fused", padded), ("fused ReLU", batches[1], "fused", padded),
            ("torch.compile", batches[0], "compile", padded),
            ("torch.compile", batches[1], "compile", padded)]
    if cuda:  # the fit loop's CUDA-graph step: 0.85x the eager one at batch 128 in the fit loop (H200)
        plan += [("CUDA graph", small[0], "graph", padded), ("CUDA graph", batches[0], "graph", padded)]
    record = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke test, not a measurement)",
              "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "student": {"D": 1845, "rank": 250, "width": width, "classes": "183 padded to 192"},
              "peak_flop_per_second": peak(device), "runs": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, batch, mode, rank in plan:
        try:
            run = variant(name, device, cfg, batch, args.steps, mode, rank)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
            run = {"variant": name, "batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if "flop_per_second" in run:
            run["mfu"] = run["flop_per_second"] / record["peak_flop_per_second"]
        record["runs"].append(run)
        print(json.dumps(run), flush=True)
        write(record, args.out)


def write(record: dict, out: Path) -> None:
    lines = [f"# One training step of the paper-size student on {record['device']}", "",
             f"torch {record['torch']}, {record['when']}; bf16 matmul peak measured in the same run: "
             f"{record['peak_flop_per_second'] / 1e12:.0f} TFLOP/s. Student {record['student']}. Step time by"
             " the wall clock around synchronized steps; GPU kernel time per kind by torch.profiler"
             " (5 steps, per step).", "",
             "MFU counts the real student's weights (rank 250), whatever rank it trains with.", "",
             "| variant | batch | ms/step | samples/s | MFU | matmul ms | optimizer ms | element-wise ms | "
             "peak GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["runs"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['error']} | | | | | | |")
            continue
        k = r["kernel_ms_by_kind"]
        mem = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['step_ms']:.2f} | "
                     f"{r['samples_per_second']:,.0f} | {r['mfu']:.1%} | {k.get('matmul', 0):.2f} | "
                     f"{k.get('optimizer', 0):.2f} | "
                     f"{k.get('element-wise', 0):.2f} | {mem} |")
    first = next((r for r in record["runs"] if "top_kernels_ms" in r), None)
    if first:
        lines += ["", f"Top kernels of `{first['variant']}` at batch {first['batch']} (ms per step):", ""]
        lines += [f"- {v:.2f} ms: `{k}`" for k, v in first["top_kernels_ms"].items()]
    write_results(out / "gpu_step_profile", record, lines, echo=False)


if __name__ == "__main__":
    main()
