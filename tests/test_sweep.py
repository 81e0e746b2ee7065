"""Issue 7: `compress sweep` on a tiny problem, figure included."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from compress.cli import cli
from compress.sweep import plot_sweep
from tests.hooks import HANG_S, sigint_default


def test_sweep_table_and_figure(tmp_path, digits_files):
    f = digits_files
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, [
        "sweep", str(f["teacher"]), "--data", str(f["x"]), "--eval-data", str(f["x_test"]), "--eval-labels",
        str(f["y_test"]), "--train-labels", str(f["y"]), "--widths", "64,512", "--ranks", "0,16",
        "--epochs", "30", "--bench-seconds", "0.02", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    mimic = [x for x in r["runs"] if x["kind"] == "mimic"]
    labels = [x for x in r["runs"] if x["kind"] == "labels"]
    assert [(x["width"], x["rank"]) for x in mimic] == [(64, 0), (64, 16), (512, 0), (512, 16)]
    assert [x["width"] for x in labels] == [64, 512]
    assert all(x["accuracy"] > 0.8 for x in r["runs"])
    assert mimic[2]["params"] == 64 * 512 + 512 + 512 * 10 + 10
    # one logit cache for the whole sweep: the teacher ran once
    assert (out / "targets.npy").exists() and not (out / "w64_k0" / "targets.npy").exists()
    for w, k in ((64, 0), (512, 16)):
        assert (out / f"w{w}_k{k}" / "student.onnx").exists()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| mimic (SNN-MIMIC) | 16L-512 | 512 | 16 |" in (out / "sweep.md").read_text()
    names = plot_sweep(r, tmp_path / "again.png")
    assert names == ["SNN-MIMIC, no bottleneck", "SNN-MIMIC, rank 16", "shallow net on labels", "teacher"]


def test_sweep_bad_widths(tmp_path, digits_files):
    result = CliRunner().invoke(cli, ["sweep", str(digits_files["teacher"]), "--data", str(digits_files["x"]),
                                      "--widths", "4k,abc"])
    assert result.exit_code == 2 and "--widths" in result.stderr
    assert np is not None


def test_ctrl_c_then_resume_keeps_the_finished_students(tmp_path, digits_files):
    """A real SIGINT to a sweep once its first student is finished: exit 130 and one line saying how
    many are finished; the same command with --resume keeps that student's files, trains the rest,
    and a second --resume trains nothing."""
    import signal
    import subprocess
    import sys

    from tests.test_distill import wait_for

    f = digits_files
    out = tmp_path / "sweep"
    args = ["sweep", str(f["teacher"]), "--data", str(f["x"]), "--eval-data", str(f["x_test"]),
            "--eval-labels", str(f["y_test"]), "--train-labels", str(f["y"]), "--widths", "64,4k",
            "--ranks", "0", "--epochs", "20", "--bench-seconds", "0.02", "--out", str(out)]
    ready = tmp_path / "ready"  # the first student is finished, and the sweep waits (tests/hooks.py)
    proc = subprocess.Popen([sys.executable, "-m", "tests.hooks", "compress.sweep:distill", "1", str(ready),
                             "--", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    wait_for(ready, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == ("Interrupted: 1 of 4 students are finished; the same "
                                               "command with --resume keeps them and continues")
    assert "Traceback" not in stderr and not (out / "sweep.json").exists()
    made = (out / "w64_k0" / "student.onnx").stat().st_mtime_ns

    resumed = CliRunner().invoke(cli, [*args, "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    runs = json.loads(resumed.stdout)["runs"]
    assert [(r["kind"], r["width"], r["reused"]) for r in runs] == [
        ("mimic", 64, True), ("mimic", 4000, False), ("labels", 64, False), ("labels", 4000, False)]
    assert (out / "w64_k0" / "student.onnx").stat().st_mtime_ns == made
    assert all(r["accuracy"] > 0.8 for r in runs)

    again = CliRunner().invoke(cli, [*args, "--resume", "--json"])
    assert again.exit_code == 0, again.output
    rows = json.loads(again.stdout)["runs"]
    assert all(r["reused"] for r in rows)
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in runs]
