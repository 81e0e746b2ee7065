"""Training under a container's CPU quota: torch's own thread count against the quota's (compress.threads).

Makes a cgroup with a CFS quota (cgroup v1 `cpu` controller, or v2 `cpu.max`; needs root and a
writable cgroup filesystem) and runs `compress.fit.fit` inside it twice per engine, alternating:
once as compress runs by default (threads capped to the quota, rounded down), once with
OMP_NUM_THREADS set to every CPU the process sees (what torch would take by itself: one thread a
core, as if no quota were there). Student: D=1845, k=250, H=8k, C=183, batch 256 (the throughput
benchmark's), random data; samples/s is the median over the timed epochs (optimizer steps only).

    python benchmarks/cpu_quota.py [--quota 1.0] [--repeats 3]
Writes benchmarks/results/cpu_quota.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_results  # noqa: E402
from compress.threads import CGROUP_ROOT, affinity  # noqa: E402

CHILD = r"""
import json, statistics, sys
import numpy as np
from compress.fit import FitConfig, fit
from compress.student import StudentConfig
from compress.threads import cpu_quota
rng = np.random.default_rng(0)
b, steps = 256, 40
x = rng.standard_normal((b * steps, 1845), dtype=np.float32)
z = rng.standard_normal((b * steps, 183), dtype=np.float32)
res = fit(x, z, x[:b], z[:b], StudentConfig((1845,), 183, 8000, 250),
          FitConfig(epochs=4, batch_size=b, engine=sys.argv[1]))
sps = statistics.median(h["step_samples_per_second"] for h in res.history[1:])
print(json.dumps({"quota_seen": cpu_quota(), "engine": res.engine, "threads": res.threads,
                  "samples_per_second": sps}))
"""


def make_cgroup(quota: float) -> Path:
    """A cgroup limited to `quota` CPUs; its cgroup.procs file is where a process is moved in."""
    period = 100_000
    v1 = CGROUP_ROOT / "cpu"
    if (v1 / "cpu.cfs_quota_us").exists():
        group = v1 / "compress-bench"
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(int(quota * period)))
    else:
        group = CGROUP_ROOT / "compress-bench"
        group.mkdir(exist_ok=True)
        (group / "cpu.max").write_text(f"{int(quota * period)} {period}")
    return group


def run_in(group: Path, engine: str, omp: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if omp:
        env["OMP_NUM_THREADS"] = omp
    # the shell moves itself into the cgroup, then becomes python: the child starts there
    cmd = ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$0" -c "$1" "$2"', sys.executable,
           CHILD, engine]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quota", type=float, default=1.0, help="CPUs' worth of time a second")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cpus = affinity()
    try:
        group = make_cgroup(args.quota)
    except OSError as e:
        sys.exit(f"cannot make a cgroup with a CPU quota here ({e}); run as root where the cgroup "
                 "filesystem is writable")
    try:
        rows = []
        for engine in ("split", "autograd"):
            capped, uncapped = [], []
            for _ in range(args.repeats):  # alternating, so that drift on a shared machine hits both
                capped.append(run_in(group, engine, None))
                uncapped.append(run_in(group, engine, str(cpus)))
            c = statistics.median(r["samples_per_second"] for r in capped)
            u = statistics.median(r["samples_per_second"] for r in uncapped)
            rows.append({"engine": engine, "quota_seen": capped[0]["quota_seen"],
                         "threads_capped": capped[0]["threads"], "threads_uncapped": uncapped[0]["threads"],
                         "samples_per_second_capped": c, "samples_per_second_uncapped": u, "ratio": c / u,
                         "capped_runs": [r["samples_per_second"] for r in capped],
                         "uncapped_runs": [r["samples_per_second"] for r in uncapped]})
    finally:
        group.rmdir()
    result = {"machine": machine(), "cpus": cpus, "quota": args.quota, "repeats": args.repeats, "rows": rows}
    quota = f"{args.quota:g} CPU" + ("" if args.quota == 1 else "s")
    lines = [f"# Training under a CPU quota of {quota} on {machine()}", "",
             f"A cgroup limited to {quota} on a machine whose process sees {cpus}; compress's "
             "thread budget (the quota rounded down) against torch's own count (OMP_NUM_THREADS="
             f"{cpus}). D=1845, k=250, H=8k, C=183, batch 256; samples/s: median of {args.repeats} "
             "alternating runs, each the median over 3 timed epochs.", "",
             "| engine | threads (budget) | samples/s | threads (torch's) | samples/s | budget / torch's |",
             "|:--|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['threads_capped']} | {r['samples_per_second_capped']:,.0f} | "
                     f"{r['threads_uncapped']} | {r['samples_per_second_uncapped']:,.0f} | "
                     f"{r['ratio']:.2f}x |")
    write_results("cpu_quota", result, lines)


if __name__ == "__main__":
    main()
