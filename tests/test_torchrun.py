"""Issue 5: `torchrun --standalone --nproc-per-node 2 compress ...` on CPU (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from compress.cli import cli

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
