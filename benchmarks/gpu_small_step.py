"""Small students on a GPU: where a training step goes when the arithmetic is tiny, and what a CUDA
graph of the whole step buys.

On an H100 the MNIST-1D conv students trained at 68-83k samples/s at batch 256 (gpu-check,
2026-11-28): about 3 ms a step for well under a GFLOP, i.e. the step is bound by launching kernels
from Python, not by the GPU. For each student (the two MNIST-1D conv students, and a 4k-wide MLP
student) and batch size this measures:
- `eager`: the fit loop's step (fp32 weights, bf16 autocast, fused AdamW, compress's own modules);
  ms a step by the wall clock over synchronized runs of steps, and GPU kernels launched per step
  (torch.profiler);
- `graph`: the same step through compress.gpu_step.GraphStep (the batch's rows gathered into fixed
  buffers, then forward, loss, backward and fused AdamW replayed as one CUDA graph), as compress.fit runs
  it; checked against eager steps from the same start (the first five losses). The committed results
  were measured with this script's first version, which captured the same step by hand.

    python benchmarks/gpu_small_step.py [--steps 200]
Writes benchmarks/results/gpu_small_step.{json,md}. Needs a CUDA GPU (exit 2 with one line without).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_results  # noqa: E402
from compress import gpu_step  # noqa: E402
from compress.gpu_step import GraphStep  # noqa: E402
from compress.student import StudentConfig, build_student, parse_spec  # noqa: E402

STUDENTS = ("64c5-p-32L-2k", "32c5-p-64c5-p-64L-1k", "4k")
BATCHES = (256, 2048)


def model_for(spec: str) -> torch.nn.Module:
    front, rank, width = parse_spec(spec)
    cfg = StudentConfig((40,), 16, width, rank, front)  # 10 classes padded to 16, as fit pads them
    m = build_student(cfg).cuda()
    m.relu.inplace = True
    if gpu_step.fuse_relu_on(torch.device("cuda")):
        gpu_step.fuse_hidden_relu(m)
    return m


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 40, generator=g).cuda(), torch.randn(n, 10, generator=g).cuda()


def eager(spec: str, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    m = model_for(spec)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    x, z = data(batch * 8)

    def step(i: int) -> torch.Tensor:
        idx = torch.arange(i % 8 * batch, (i % 8 + 1) * batch, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = 0.5 * ((m(x[idx])[:, :10].float() - z[idx]) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    losses = [float(step(i)) for i in range(5)]
    for i in range(20):
        step(i)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t) / steps
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(5):
                step(i)
            torch.cuda.synchronize()
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 5
    except Exception:  # the profiler is a nicety here: the timing above stands without it
        kernels = float("nan")
    return {"ms": ms, "kernels_per_step": kernels, "first_losses": losses}


def graphed(spec: str, batch: int, steps: int) -> dict:
    """The same step through compress.gpu_step.GraphStep, as compress.fit runs it (`--engine graph`)."""
    torch.manual_seed(0)
    m = model_for(spec)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    x, z = data(batch * 8)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    graph = GraphStep(m, opt, lambda s, t: 0.5 * ((s - t) ** 2).sum(1).mean(), slice(0, 10), batch, autocast)
    rows = [torch.arange(i * batch, (i + 1) * batch, device="cuda") for i in range(8)]
    # the eager steps of `eager` start from the same weights; the first 5 losses are compared (the first
    # step runs eagerly and is captured, the next ones replay the graph)
    losses = [float(graph.step(x, z, rows[i])) for i in range(5)]
    if graph.failed:
        raise RuntimeError(graph.failed)
    for i in range(20):
        graph.step(x, z, rows[i % 8])
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        graph.step(x, z, rows[i % 8])
    torch.cuda.synchronize()
    return {"ms": 1e3 * (time.perf_counter() - t) / steps, "first_losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("Error: gpu_small_step: torch sees no CUDA GPU here", file=sys.stderr)
        sys.exit(2)
    name = torch.cuda.get_device_name()
    rows = []
    for spec in STUDENTS:
        for batch in BATCHES:
            r = {"student": spec, "batch": batch, "eager": eager(spec, batch, args.steps)}
            try:
                r["graph"] = graphed(spec, batch, args.steps)
            except Exception as e:  # recorded, not hidden: what broke the capture
                r["graph"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(json.dumps(r), flush=True)
            rows.append(r)
            write(name, rows)


def write(name: str, rows: list[dict]) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    lines = [f"# Small students' training step on {name}", "",
             f"torch {torch.__version__}, {when}. bf16 autocast, fused AdamW; ms a step by the wall clock "
             "(synchronized, after 20 warm-up steps); kernels per step by torch.profiler.", "",
             "| student | batch | eager ms | kernels/step | eager samples/s | graph ms | graph samples/s | "
             "speedup | losses match |", "|---|---:|---:|---:|---:|---:|---:|---:|:--|"]
    for r in rows:
        e, gr = r["eager"], r["graph"]
        if "error" in gr:
            lines.append(f"| `{r['student']}` | {r['batch']} | {e['ms']:.3f} | {e['kernels_per_step']:.0f} | "
                         f"{r['batch'] / e['ms'] * 1e3:,.0f} | failed: {gr['error'][:80]} | | | |")
            continue
        pairs = zip(e["first_losses"], gr["first_losses"], strict=True)
        match = all(abs(a - b) <= 2e-2 * max(1.0, abs(a)) for a, b in pairs)
        lines.append(f"| `{r['student']}` | {r['batch']} | {e['ms']:.3f} | {e['kernels_per_step']:.0f} | "
                     f"{r['batch'] / e['ms'] * 1e3:,.0f} | {gr['ms']:.3f} | "
                     f"{r['batch'] / gr['ms'] * 1e3:,.0f} | "
                     f"{e['ms'] / gr['ms']:.1f}x | {'yes' if match else 'NO'} |")
    record = {"device_name": name, "torch": torch.__version__, "when": when, "rows": rows}
    write_results("gpu_small_step", record, lines, echo=False)


if __name__ == "__main__":
    main()
