"""Issue 5: `torchrun --standalone --nproc-per-node 2 compress ...` on CPU (gloo)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from compress.cli import cli
from compress.teachers import load_teacher

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "compress"]


def test_distill_data_parallel_matches_single_process(tmp_path, digits_files):
    f = digits_files
    args = ["distill", str(f["teacher"]), "--data", str(f["x"]), "--eval-data", str(f["x_test"]),
            "--eval-labels", str(f["y_test"]), "--width", "1k", "--rank", "32", "--bench-seconds", "0.05",
            "--json"]
    done = subprocess.run([*TORCHRUN, *args, "--out", str(tmp_path / "ddp")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ddp = json.loads(done.stdout)  # rank 0's report only: one JSON document on stdout
    single = json.loads(CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "one")]).stdout)
    assert ddp["train"]["world_size"] == 2 and single["train"]["world_size"] == 1
    assert ddp["student"]["accuracy"] >= single["student"]["accuracy"] - 0.015
    assert ddp["student"]["accuracy"] >= ddp["teacher"]["accuracy"] - 0.03
    np.testing.assert_allclose(np.load(tmp_path / "ddp" / "targets.npy"),
                               np.load(tmp_path / "one" / "targets.npy"), rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "ddp" / "checkpoint.pt").exists()


def test_targets_data_parallel(tmp_path, digits_files):
    f = digits_files
    args = ["targets", str(f["teacher"]), "--data", str(f["x"])]
    done = subprocess.run([*TORCHRUN, *args, "--out", str(tmp_path / "z2.npy")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.strip().splitlines()) == 1  # rank 0 alone speaks
    one = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "z1.npy")])
    assert one.exit_code == 0
    np.testing.assert_allclose(np.load(tmp_path / "z2.npy"), np.load(tmp_path / "z1.npy"),
                               rtol=1e-5, atol=1e-5)


def test_streamed_distill_data_parallel(tmp_path, digits_files):
    """A transfer set over --memory-budget: each rank reads its own shard of rows block by block."""
    f = digits_files
    args = ["distill", str(f["teacher"]), "--data", str(f["x"]), "--eval-data", str(f["x_test"]),
            "--eval-labels", str(f["y_test"]), "--width", "1k", "--rank", "32", "--bench-seconds", "0.05",
            "--memory-budget", "150K", "--json", "--out", str(tmp_path / "ddp")]
    done = subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["train"]["world_size"] == 2 and report["train"]["streamed"] is True
    assert report["student"]["accuracy"] >= report["teacher"]["accuracy"] - 0.03


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (found through /proc), the children first."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    order, todo = [], [pid]
    while todo:
        order.append(todo.pop())
        todo += children.get(order[-1], [])
    for p in reversed(order):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("gated", ["both", "rank0"])
def test_killed_distributed_labelling_resumes(tmp_path, gated):
    """Each rank's shard is a resumable cache: kill -9 the whole torchrun, run it again, and the rows
    labelled before the kill are kept (a planted value survives), the rest computed, nothing left over.
    With rank 1 let through, its shard is finished before the kill and is read back. The teacher
    (tests/gated_teacher.py) stops each gated rank after its first committed chunk: no race."""
    import torch

    from compress.targets import CHUNK_ROWS
    from tests.gated_teacher import make

    n = 4 * CHUNK_ROWS
    x = np.random.default_rng(0).standard_normal((n, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    torch.save(make().state_dict(), tmp_path / "t.pt")
    args = ["targets", str(tmp_path / "t.pt"), "--arch", "tests.gated_teacher:make", "--data",
            str(tmp_path / "x.npy")]
    out = tmp_path / "z.npy"
    shards = [(0, n // 2), (n // 2, n)]
    partial = {a: tmp_path / f"..z.npy.shard-{a}-{b}.npy.partial" for a, b in shards}
    finished = {a: tmp_path / f".z.npy.shard-{a}-{b}.npy" for a, b in shards}
    env = {**os.environ, "GATE_AFTER_ROWS": str(CHUNK_ROWS)}
    if gated == "rank0":
        env["GATE_RANK"] = "0"

    def committed(a: int, b: int) -> bool:  # rows committed, or (rank 1 let through) the whole shard
        if gated == "rank0" and a > 0:
            return finished[a].exists()
        state = tmp_path / f"..z.npy.shard-{a}-{b}.npy.progress.json"
        try:
            return json.loads(state.read_text())["done"] > 0
        except (OSError, ValueError):
            return False

    proc = subprocess.Popen([*TORCHRUN, *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300  # a hang guard only: no rank can pass its gate
    while time.monotonic() < deadline and proc.poll() is None and not all(committed(*s) for s in shards):
        time.sleep(0.01)
    assert proc.poll() is None and all(committed(*s) for s in shards)
    kill_tree(proc.pid)  # torchrun starts its workers in sessions of their own
    proc.wait()
    assert not out.exists()
    firsts = [a for a, _ in shards]
    for a in firsts:  # plant a value in row 0 of each shard, labelled already
        m = np.load(finished[a] if finished[a].exists() else partial[a], mmap_mode="r+")
        m[0] = 12345.0
        m.flush()
        del m
    done = subprocess.run([*TORCHRUN, *args, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    z = np.load(out)
    full = load_teacher([tmp_path / "t.pt"], arch="tests.gated_teacher:make").logits(x, 8192)
    assert (z[firsts] == 12345.0).all()  # kept, not labelled again
    keep = np.ones(len(z), bool)
    keep[firsts] = False
    np.testing.assert_allclose(z[keep], full[keep], rtol=1e-5, atol=1e-5)
    assert not [p for p in os.listdir(tmp_path) if "shard" in p]
