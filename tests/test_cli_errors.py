"""Bad input: exit status 2, one line naming the file or option, no traceback, no student.onnx."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from compress.cli import cli
from tests.hooks import HANG_S


def run_distill(tmp_path, teacher, data, *extra):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["distill", str(teacher), "--data", str(data), "--out", str(out),
                                      "--epochs", "1", *extra])
    return result, out


def assert_one_line_error(result, out, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not (out / "student.onnx").exists()


def test_missing_teacher(tmp_path, digits_files):
    result, out = run_distill(tmp_path, tmp_path / "nope.onnx", digits_files["x"])
    assert_one_line_error(result, out, "nope.onnx", "file not found")


def test_corrupt_onnx(tmp_path, digits_files):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    result, out = run_distill(tmp_path, bad, digits_files["x"])
    assert_one_line_error(result, out, "bad.onnx", "not a valid ONNX model")


def test_truncated_onnx(tmp_path, digits_files):
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(digits_files["teacher"].read_bytes()[:3000])
    result, out = run_distill(tmp_path, bad, digits_files["x"])
    assert_one_line_error(result, out, "cut.onnx")


@pytest.mark.parametrize("make,needles", [
    (lambda p: None, ["--data", "file not found"]),
    (lambda p: p.write_bytes(b""), ["--data", "empty"]),
    (lambda p: np.save(p, np.zeros((30, 63), np.float32)), ["--data", "(63,)", "(64,)"]),
    (lambda p: np.save(p, np.full((30, 64), np.nan, np.float32)), ["--data", "NaN"]),
    (lambda p: np.save(p, np.array([object()] * 3, dtype=object), allow_pickle=True),
     ["--data", "not a valid .npy"]),
    (lambda p: np.save(p, np.zeros((5, 64), np.float32)), ["--data", "too few"]),
])
def test_bad_data(tmp_path, digits_files, make, needles):
    data = tmp_path / "x.npy"
    make(data)
    result, out = run_distill(tmp_path, digits_files["teacher"], data)
    assert_one_line_error(result, out, str(data), *needles) if "too few" not in needles else \
        assert_one_line_error(result, out, *needles)


def test_out_is_a_file(tmp_path, digits_files):
    (tmp_path / "taken").write_text("x")
    result = CliRunner().invoke(cli, ["distill", str(digits_files["teacher"]), "--data",
                                      str(digits_files["x"]), "--out", str(tmp_path / "taken")])
    assert_one_line_error(result, tmp_path, "--out", "not a folder")


def test_label_count_mismatch(tmp_path, digits_files):
    f = digits_files
    np.save(tmp_path / "y.npy", np.zeros(10, np.int64))
    result, out = run_distill(tmp_path, f["teacher"], f["x"], "--eval-data", str(f["x_test"]),
                              "--eval-labels", str(tmp_path / "y.npy"))
    assert_one_line_error(result, out, "--eval-labels", "10 labels", "597 samples")


def test_labels_without_eval_data(tmp_path, digits_files):
    f = digits_files
    result, out = run_distill(tmp_path, f["teacher"], f["x"], "--eval-labels", str(f["y_test"]))
    assert_one_line_error(result, out, "--eval-labels", "--eval-data")


@pytest.mark.parametrize("opt,value,needle", [
    ("--width", "abc", "--width"), ("--width", "0", "--width"), ("--width", "1.5", "--width"),
    ("--rank", "-1", "--rank"), ("--rank", "x", "--rank"), ("--rank", "65", "--rank"),
    ("--epochs", "0", "--epochs"), ("--lr", "0", "--lr"), ("--batch-size", "0", "--batch-size"),
])
def test_bad_options(tmp_path, digits_files, opt, value, needle):
    result, out = run_distill(tmp_path, digits_files["teacher"], digits_files["x"], opt, value)
    assert_one_line_error(result, out, needle)


def test_a_student_too_large_to_convert_is_refused_before_training(tmp_path, digits_files):
    result, out = run_distill(tmp_path, digits_files["teacher"], digits_files["x"], "--width", "7M",
                              "--rank", "0", "--precision", "fp16")
    assert_one_line_error(result, out, "--precision fp16", "525,000,010 weights", "2 GiB")
    assert not (out / "targets.npy").exists()  # refused before labelling, long before training


def test_help_is_fast_and_does_not_import_torch():
    code = ("import sys, compress.cli.main; "
            "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "compress", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "distill" in done.stdout
    assert time.perf_counter() - t < 2.0


def _with_file_size_limit(limit):
    """preexec_fn: files this process writes may not pass `limit` bytes (writes past it fail with
    EFBIG, as on a full disk: the same path through the code, without root or a small filesystem)."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics are Linux's")
@pytest.mark.parametrize("stage", ["targets", "checkpoint", "export"])
def test_a_write_that_does_not_fit_is_one_line_and_leaves_nothing(tmp_path, digits_files, stage):
    """A full disk (here: a file size limit) while labelling, checkpointing or exporting: exit 2 and
    one line naming the file, no traceback, and no partial, temporary or final file left behind.
    Before, labelling died of SIGBUS (exit 135, no message) and the others printed a traceback."""
    from pathlib import Path

    f, out, z = digits_files, tmp_path / "out", tmp_path / "z.npy"
    np.save(z, np.random.default_rng(0).standard_normal((len(np.load(f["x"])), 10), dtype=np.float32))
    fit = ["fit", "--data", str(f["x"]), "--targets", str(z), "--width", "1k", "--rank", "16",
           "--epochs", "1"]
    if stage == "targets":  # the digits' logits: ~57 KB of float32
        args, limit, named = ["targets", str(f["teacher"]), "--data", str(f["x"]), "--out",
                              str(out / "z.npy")], 20_000, out / "z.npy"
    elif stage == "checkpoint":  # a 1k-wide student's weights and both Adam moments: ~0.5 MB
        args, limit, named = [*fit, "--out", str(out)], 300_000, out / "checkpoint.pt"
    else:  # a student made without the limit (~0.2 MB of ONNX), exported under it
        made = CliRunner().invoke(cli, [*fit, "--out", str(tmp_path / "made")])
        assert made.exit_code == 0, made.output
        args, limit, named = ["export", str(tmp_path / "made" / "student.pt"), "--out",
                              str(out / "s.onnx")], 30_000, out / "s.onnx"
    r = subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True,
                       preexec_fn=_with_file_size_limit(limit), timeout=HANG_S)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"Error: {named}: cannot write it: File too large")
    assert "Traceback" not in r.stderr
    left = sorted(p.name for p in Path(out).rglob("*"))
    assert left == [], left


def test_a_second_run_on_a_busy_folder_is_refused(tmp_path, digits_files):
    """While one run holds --out (or a logit cache), distill, fit, sweep and targets on it fail at
    once with one line naming it and the holder's pid; once it is released they run."""
    import os

    from compress.atomic import exclusive
    from compress.pipeline import LOCK

    f, out = digits_files, tmp_path / "out"
    distill = ["distill", str(f["teacher"]), "--data", str(f["x"]), "--width", "64", "--rank", "0",
               "--epochs", "1", "--bench-seconds", "0.02", "--out", str(out)]
    with exclusive(out / LOCK, "the first run"):
        for args in (distill, ["sweep", *distill[1:4], "--widths", "64", "--ranks", "0", "--out", str(out)],
                     ["fit", "--data", str(f["x"]), "--targets", str(f["x"]), "--out", str(out)]):
            r = CliRunner().invoke(cli, args)
            assert_one_line_error(r, out, f"--out {out}: another compress run (pid {os.getpid()})")
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing labelled, nothing written
    z = tmp_path / "z.npy"
    with exclusive(tmp_path / ".z.npy.lock", "the first run"):
        r = CliRunner().invoke(cli, ["targets", str(f["teacher"]), "--data", str(f["x"]), "--out", str(z)])
        assert_one_line_error(r, out, f"{z}: another compress run")
    assert CliRunner().invoke(cli, distill).exit_code == 0
    assert CliRunner().invoke(cli, ["targets", str(f["teacher"]), "--data", str(f["x"]), "--out",
                                    str(z)]).exit_code == 0
    assert not list(tmp_path.rglob("*.lock"))  # each run removed its lock on the way out


def test_a_lock_removed_by_its_holder_before_we_hold_it_is_taken_afresh(tmp_path, monkeypatch):
    """The holder removes its lock file as it leaves: a run that opened the old file just before then
    must not keep that orphan (a third run would lock the new file beside it) but lock the new one."""
    import fcntl
    import os

    from compress.atomic import exclusive

    lock, real, calls = tmp_path / ".x.lock", fcntl.flock, []

    def flock(fd, op):
        if not calls:
            lock.unlink()  # the holder left between our open() and our flock()
        calls.append(fd)
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with exclusive(lock, "x"):
        assert len(calls) == 2 and lock.read_text() == f"{os.getpid()}\n"
        assert os.stat(lock).st_ino == os.fstat(calls[1]).st_ino
    assert not lock.exists()
