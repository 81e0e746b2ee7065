"""`make gpu-check`: everything only a GPU can show, in one command of a few minutes on an H100.

Steps, each under its own time limit, each recorded whether it passed, failed or was skipped (and why):
1. the GPU tests (`pytest -m gpu`);
2. training throughput of the paper-size student (D=1845, k=250, H=400k, C=183) in bf16, as MFU
   against the bf16 matmul peak measured in the same run (benchmarks/train_throughput.py);
3. labelling with onnxruntime's CUDA execution provider (`compress targets --device cuda`), checked
   against the CPU provider's logits;
4. `compress distill --device cuda` end to end for an MLP and a conv student (bf16 on the GPU), with
   fp16 and static int8 exports;
5. `compress bench --provider cuda` on the MLP student of step 4.
Steps 3 and 5 need onnxruntime-gpu; where onnxruntime has no CUDA provider they are recorded as
skipped with that reason, not failed.

Writes benchmarks/results/gpu_check.{json,md} with the device's name. Without a CUDA GPU: one line,
exit status 2, nothing written.

    python benchmarks/gpu_check.py [--budget-s 420]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, write_results  # noqa: E402

NEEDED = ("numpy", "torch", "onnx", "onnxruntime", "click", "rich", "sklearn", "mnist1d", "pytest")


def fail(message: str) -> None:
    print(f"Error: gpu-check: {message}", file=sys.stderr)
    sys.exit(2)


def carried_wheels() -> None:
    """A GPU machine without network: wheels carried in .whl/ (`make gpu-wheels`) go to /tmp/site."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return
    site = Path(tempfile.gettempdir()) / "compress-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                    str(site), *map(str, wheels)], check=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])


def preflight() -> dict:
    import importlib.util

    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        carried_wheels()
        missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"missing Python packages: {', '.join(missing)} (install them, or carry wheels: see README)")
    import torch

    if not torch.cuda.is_available():
        fail("torch sees no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine")
    import onnxruntime as ort

    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "memory_gib": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda, "onnxruntime": ort.__version__,
            "ort_providers": ort.get_available_providers(), "python": sys.version.split()[0]}


def step(name: str, cmd: list[str], limit_s: float, env: dict | None = None) -> dict:
    """Run one step; its last lines of output are kept in the record."""
    print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s,
                           env={**os.environ, **(env or {}),
                                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
        status = "passed" if p.returncode == 0 else f"failed (exit {p.returncode})"
        tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
    except subprocess.TimeoutExpired as e:
        status = f"failed (over its {limit_s:.0f} s limit)"
        out = (e.stdout or b"") + (e.stderr or b"")
        tail = (out.decode(errors="replace") if isinstance(out, bytes) else out).splitlines()[-15:]
    seconds = round(time.perf_counter() - t, 1)
    print(f"gpu-check: {name}: {status} in {seconds} s", file=sys.stderr, flush=True)
    return {"step": name, "status": status, "seconds": seconds, "output_tail": tail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=420, help="all steps together (8 minutes less start)")
    args = ap.parse_args()
    info = preflight()
    py = sys.executable
    steps = [step("GPU tests (pytest -m gpu)",
                  [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], 0.35 * args.budget_s)]
    steps.append(step("paper-size student, bf16 training throughput",
                      [py, "benchmarks/train_throughput.py", "--steps-per-epoch", "20", "--epochs", "4",
                       "--repeats", "1", "--conv-repeats", "1"], 0.4 * args.budget_s))
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    no_cuda_ep = None if "CUDAExecutionProvider" in info["ort_providers"] else (
        f"onnxruntime {info['onnxruntime']} here has no CUDAExecutionProvider (providers: "
        f"{', '.join(info['ort_providers'])}); install onnxruntime-gpu to check it")
    for name, script, share, needs_ep in (
            ("labelling with the CUDA provider", CUDA_LABELLING, 0.15, True),
            ("distill on the GPU (an MLP and a conv student, fp16 and static int8)", CUDA_DISTILL, 0.2,
             False),
            ("compress bench --provider cuda", CUDA_BENCH, 0.1, True)):
        if needs_ep and no_cuda_ep:
            steps.append({"step": name, "status": f"skipped: {no_cuda_ep}", "seconds": 0.0,
                          "output_tail": []})
        else:
            steps.append(step(name, [py, "-c", script, str(work)], share * args.budget_s))
    throughput = RESULTS / "train_throughput_cuda.json"
    record = {**info, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": steps,
              "train_throughput": json.loads(throughput.read_text()) if throughput.exists() else None}
    lines = [f"# gpu-check on {info['device']} ({info['memory_gib']} GiB), {record['when']}", "",
             f"torch {info['torch']} (CUDA {info['cuda']}), onnxruntime {info['onnxruntime']} "
             f"({', '.join(info['ort_providers'])}), Python {info['python']}", "",
             "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
    write_results("gpu_check", record, lines)
    sys.exit(0 if all(s["status"] == "passed" or s["status"].startswith("skipped") for s in steps) else 1)


# Step 3: the demo teacher labels 20,000 MNIST-1D samples on the CUDA provider; compared with the CPU's.
CUDA_LABELLING = r"""
import sys, time, numpy as np
from pathlib import Path
from compress.demo import mnist1d, teacher_path
from compress.teachers import load_teacher
work = Path(sys.argv[1])
x = mnist1d(20_000, seed=7, train_split=1.0)["x"]
np.save(work / "x.npy", x)
gpu = load_teacher([teacher_path()], device="cuda")
print("providers:", gpu.session.get_providers())
assert gpu.session.get_providers()[0] == "CUDAExecutionProvider", gpu.session.get_providers()
t = time.perf_counter(); zg = gpu.logits(x, 4096); tg = time.perf_counter() - t
cpu = load_teacher([teacher_path()], device="cpu")
t = time.perf_counter(); zc = cpu.logits(x, 4096); tc = time.perf_counter() - t
diff = float(np.abs(zg - zc).max())
print(f"20,000 rows: CUDA {tg:.2f} s, CPU {tc:.2f} s, max |cuda - cpu| {diff:.2e}")
assert diff < 1e-3
"""

# Step 4: `compress distill --device cuda` end to end (labelling on whatever provider onnxruntime has),
# for an MLP student and a conv student (bf16 autograd on the GPU), with a static int8 export.
CUDA_DISTILL = r"""
import json, subprocess, sys
import numpy as np
from pathlib import Path
from compress.demo import mnist1d, teacher_path
work = Path(sys.argv[1])
if not (work / "x.npy").exists():
    np.save(work / "x.npy", mnist1d(20_000, seed=7, train_split=1.0)["x"])
run = [sys.executable, "-m", "compress"]
for name, student in (("mlp", "4k"), ("conv", "32c5-p-64c5-p-64L-1k")):
    out = work / name
    subprocess.run([*run, "distill", str(teacher_path()), "--data", str(work / "x.npy"), "--student", student,
                    "--epochs", "8", "--batch-size", "256", "--device", "cuda", "--precision", "fp16,int8",
                    "--quantize", "static", "--min-agreement", "0.95", "--bench-seconds", "0.1",
                    "--out", str(out)], check=True)
    r = json.loads((out / "report.json").read_text())
    t = r["train"]
    assert t["device"].startswith("cuda"), t["device"]
    print(name, r["student"]["spec"], r["student"]["params"], "device", t["device"], "engine", t["engine"],
          "samples/s", round(t["samples_per_second"]), "agreement", round(r["fidelity"]["agreement"], 4),
          "export diff", r["export"]["max_abs_diff"],
          [(e["precision"], e["agreement_with_fp32"]) for e in r["exports"]])
"""

# Step 5: `compress bench` on the CUDA provider, the MLP student of step 4 against the teacher.
CUDA_BENCH = r"""
import subprocess, sys
from pathlib import Path
from compress.demo import teacher_path
work = Path(sys.argv[1])
subprocess.run([sys.executable, "-m", "compress", "bench", str(work / "mlp" / "student.onnx"),
                str(teacher_path()), "--provider", "cuda", "--batch-sizes", "1,256,4096"], check=True)
"""

if __name__ == "__main__":
    main()
