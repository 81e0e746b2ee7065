"""The logit cache at scale: throughput against raw onnxruntime, and a 2 GiB transfer set labelled
under a 1.5 GiB memory cap.

1. Throughput: the same teacher (the bundled MNIST-1D CNN) on the same rows, batch 1024:
   (a) raw `session.run` over in-memory batches, no I/O at all;
   (b) `compress targets`' cache step: chunked reads from a memory-mapped .npy on disk (prefetched in a
       thread), the teacher, writes to the memory-mapped cache, flush and progress commit per chunk.
   Reported as samples/s and the ratio (b)/(a); the goal is >= 90%.
2. Memory: a 2 GiB float32 .npy (8.4M x 64, a linear 64 -> 10 ONNX teacher) through `compress targets`
   in a process inside a cgroup (v1 or v2) limited to 1.5 GiB. Needs root and a writable cgroup
   hierarchy; skipped (and said so) otherwise.

    python benchmarks/targets_scale.py
Writes benchmarks/results/targets_scale.{json,md}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_results  # noqa: E402

CAP = 1536 * 2**20


def throughput(work: Path) -> dict[str, float]:
    from compress.demo import mnist1d, teacher_path
    from compress.targets import compute_targets
    from compress.teachers import load_teacher

    x = np.tile(mnist1d(20_000, 7, 1.0)["x"], (15, 1))  # 300,000 x 40
    np.save(work / "x.npy", x)
    teacher = load_teacher([teacher_path()], device="cpu")
    sess, name = teacher.session, teacher.signature.input_name
    batches = [x[i : i + 1024] for i in range(0, len(x), 1024)]
    best_raw, best_cache = 0.0, 0.0
    for _ in range(3):  # alternate, keep each one's best: the machine is shared and noisy
        t = time.perf_counter()
        for b in batches:
            sess.run(None, {name: b})
        best_raw = max(best_raw, len(x) / (time.perf_counter() - t))
        xm = np.load(work / "x.npy", mmap_mode="r")
        t = time.perf_counter()
        compute_targets(teacher, xm, work / f"z{_}.npy", {"run": _}, 1024)
        best_cache = max(best_cache, len(x) / (time.perf_counter() - t))
    return {"samples": len(x), "raw_session_run_samples_per_s": best_raw,
            "cache_step_samples_per_s": best_cache, "ratio": best_cache / best_raw}


def _cgroup(name: str) -> tuple[Path, str, str] | None:
    """A fresh memory cgroup: (folder, limit file, peak file), or None when none can be made."""
    v1 = Path("/sys/fs/cgroup/memory")
    for base, limit, peak in ((v1, "memory.limit_in_bytes", "memory.max_usage_in_bytes"),
                              (Path("/sys/fs/cgroup"), "memory.max", "memory.peak")):
        try:
            folder = base / name
            folder.mkdir(exist_ok=True)
            (folder / limit).write_text(str(CAP))
            return folder, limit, peak
        except OSError:
            continue
    return None


def memory_cap(work: Path) -> dict[str, object]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((64, 10)).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["logits"])], "lin",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(work / "lin.onnx"))
    n = 2**31 // (64 * 4)  # 2 GiB
    big = np.lib.format.open_memmap(work / "big.npy", mode="w+", dtype=np.float32, shape=(n, 64))
    for i in range(0, n, 1 << 20):
        big[i : i + (1 << 20)] = rng.standard_normal((min(1 << 20, n - i), 64), dtype=np.float32)
    big.flush()
    del big
    group = _cgroup(f"compress-bench-{os.getpid()}")
    if group is None:
        return {"skipped": "no writable memory cgroup (needs root and cgroup v1 or v2)"}
    folder, limit, peak = group
    cmd = [sys.executable, "-m", "compress", "targets", str(work / "lin.onnx"), "--data",
           str(work / "big.npy"), "--out", str(work / "zbig.npy")]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: (folder / "cgroup.procs").write_text(str(os.getpid())))
    out, err = proc.communicate()
    seconds = time.perf_counter() - t
    result = {"data_bytes": (work / "big.npy").stat().st_size, "cap_bytes": CAP,
              "returncode": proc.returncode, "seconds": seconds,
              "cgroup_peak_bytes": int((folder / peak).read_text()) if (folder / peak).exists() else None,
              "stdout": out.decode().strip()[-200:], "stderr_tail": err.decode().strip()[-300:]}
    if proc.returncode == 0:
        z = np.load(work / "zbig.npy", mmap_mode="r")
        xs = np.load(work / "big.npy", mmap_mode="r")[-5:]
        result["last_rows_match"] = bool(np.allclose(z[-5:], xs @ w + b, rtol=1e-4, atol=1e-4))
    folder.rmdir()
    return result


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="targets-scale-"))
    try:
        result = {"machine": machine(), "throughput": throughput(work), "memory_cap": memory_cap(work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t, m = result["throughput"], result["memory_cap"]
    lines = ["# The logit cache at scale", "", f"Machine: {result['machine']}.", "",
             f"Throughput, MNIST-1D CNN teacher, {t['samples']:,} samples, batch 1024 (best of 3 each): "
             f"raw session.run {t['raw_session_run_samples_per_s']:,.0f} samples/s; cache step (disk reads, "
             f"writes, commits) {t['cache_step_samples_per_s']:,.0f} samples/s: **{100 * t['ratio']:.0f}%**.",
             ""]
    if "skipped" in m:
        lines.append(f"Memory cap: skipped ({m['skipped']}).")
    else:
        lines.append(f"Memory cap: {m['data_bytes'] / 2**30:.2f} GiB transfer set through `compress targets` "
                     f"in a cgroup limited to {m['cap_bytes'] / 2**30:.2f} GiB: exit {m['returncode']} in "
                     f"{m['seconds']:.0f} s, cgroup peak {m['cgroup_peak_bytes'] / 2**30:.2f} GiB "
                     f"(page cache included), last rows correct: {m.get('last_rows_match')}.")
    write_results("targets_scale", result, lines)


if __name__ == "__main__":
    main()
