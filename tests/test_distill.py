"""The issue's acceptance: a 64-feature ONNX CNN teacher distilled end to end through the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from compress.cli import cli
from tests.hooks import HANG_S, sigint_default


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, digits_files):
    out = tmp_path_factory.mktemp("run")
    f = digits_files
    args = ["distill", str(f["teacher"]), "--data", str(f["x"]), "--eval-data", str(f["x_test"]),
            "--eval-labels", str(f["y_test"]), "--width", "2k", "--rank", "32", "--out", str(out),
            "--precision", "fp16,int8", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out, result


def test_report_has_the_contract_keys(distilled):
    out, _ = distilled
    r = json.loads((out / "report.json").read_text())
    for section, keys in {
        "teacher": ["params", "size_bytes", "accuracy", "latency_ms"],
        "student": ["params", "size_bytes", "accuracy", "width", "rank", "latency_ms"],
        "fidelity": ["agreement", "logit_rmse"],
        "export": ["path", "max_abs_diff"],
        "train": ["epochs", "seconds", "samples_per_second", "device"],
    }.items():
        for k in keys:
            assert k in r[section], f"{section}.{k}"
    for who in ("teacher", "student"):
        for b in ("1", "256"):
            lat = r[who]["latency_ms"][b]
            assert 0 < lat["p50"] <= lat["p99"]
    assert {p.name for p in out.iterdir()} >= {"student.onnx", "student.pt", "report.json", "report.md",
                                               "targets.npy"}
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert [n for n in r["train"]["notes"] if "constant over" not in n] == []  # digits: 3 blank pixels
    assert r["train"]["batch_size"] == 128 and r["train"]["streamed"] is False
    from compress.evaluate import render_markdown  # a changed request is said in report.md too

    r["train"]["notes"] = ["--batch-size: 4096 does not fit; training with 1024"]
    assert "Note: --batch-size: 4096 does not fit; training with 1024" in render_markdown(r)
    assert f"on cpu, {'autograd' if r['train']['engine'] == 'autograd' else 'the split CPU step'} (" in (
        out / "report.md").read_text()  # which training step ran
    r["train"].update(device="cuda:0", engine="graph")
    assert "on cuda:0, one CUDA graph a step (" in render_markdown(r)


def test_student_matches_teacher(distilled, digits_files, digits):
    out, _ = distilled
    r = json.loads((out / "report.json").read_text())
    assert r["student"]["params"] == 64 * 32 + 32 * 2000 + 2000 + 2000 * 10 + 10
    assert r["student"]["width"] == 2000 and r["student"]["rank"] == 32
    assert r["teacher"]["accuracy"] > 0.9
    assert r["student"]["accuracy"] >= r["teacher"]["accuracy"] - 0.03
    assert r["fidelity"]["agreement"] > 0.9
    assert r["export"]["max_abs_diff"] <= 1e-4
    # the teacher's parameter count comes from its initializers
    from tests.conftest import DigitsCNN

    assert r["teacher"]["params"] == sum(p.numel() for p in DigitsCNN().parameters())


def test_exported_file_reproduces_reported_accuracy(distilled, digits):
    out, _ = distilled
    r = json.loads((out / "report.json").read_text())
    sess = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    (logits,) = sess.run(None, {"x": digits["x_test"]})
    assert float((logits.argmax(1) == digits["y_test"]).mean()) == pytest.approx(r["student"]["accuracy"])


def test_json_flag_prints_only_the_report(distilled):
    out, result = distilled
    assert json.loads(result.stdout) == json.loads((out / "report.json").read_text())


def test_student_pt_reloads_and_reexports(distilled, digits, digits_files, tmp_path):
    out, _ = distilled
    result = CliRunner().invoke(cli, ["export", str(out / "student.pt"), "--out", str(tmp_path / "s.onnx"),
                                      "--data", str(digits_files["x_test"])])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_abs_diff"] <= 1e-4
    a = ort.InferenceSession(str(out / "student.onnx")).run(None, {"x": digits["x_test"]})[0]
    b = ort.InferenceSession(str(tmp_path / "s.onnx")).run(None, {"x": digits["x_test"]})[0]
    np.testing.assert_array_equal(a, b)


def test_second_run_reuses_the_logit_cache(distilled, digits_files):
    out, _ = distilled
    f = digits_files
    before = (out / "targets.npy").stat().st_mtime_ns
    result = CliRunner().invoke(cli, ["distill", str(f["teacher"]), "--data", str(f["x"]), "--width",
                                      "64", "--rank", "0", "--epochs", "2", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["transfer"]["targets_cached"] is True
    assert (out / "targets.npy").stat().st_mtime_ns == before
    assert r["teacher"]["accuracy"] is None and r["eval"]["labels"] is False  # held-out slice, no labels


def test_targets_command_matches_the_teacher(digits_files, digits, tmp_path):
    f = digits_files
    result = CliRunner().invoke(cli, ["targets", str(f["teacher"]), "--data", str(f["x"]),
                                      "--out", str(tmp_path / "z.npy"), "--batch-size", "100"])
    assert result.exit_code == 0, result.output
    z = np.load(tmp_path / "z.npy")
    (ref,) = ort.InferenceSession(str(f["teacher"])).run(None, {"x": digits["x"]})
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)


def test_targets_then_fit(tmp_path, digits_files, digits):
    f = digits_files
    z = tmp_path / "z.npy"
    assert CliRunner().invoke(cli, ["targets", str(f["teacher"]), "--data", str(f["x"]), "--out",
                                    str(z)]).exit_code == 0
    result = CliRunner().invoke(cli, ["fit", "--data", str(f["x"]), "--targets", str(z), "--width", "1k",
                                      "--rank", "32", "--out", str(tmp_path / "fit"), "--json",
                                      "--input-name", "pixels"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["student"]["params"] == 64 * 32 + 32 * 1000 + 1000 + 1000 * 10 + 10
    assert r["fidelity"]["agreement"] > 0.9 and r["export"]["max_abs_diff"] <= 1e-4
    sess = ort.InferenceSession(str(tmp_path / "fit" / "student.onnx"))
    (logits,) = sess.run(None, {"pixels": digits["x_test"]})
    assert (logits.argmax(1) == digits["y_test"]).mean() > 0.9
    np.save(tmp_path / "short.npy", np.load(z)[:100])
    bad = CliRunner().invoke(cli, ["fit", "--data", str(f["x"]), "--targets", str(tmp_path / "short.npy")])
    assert bad.exit_code == 2 and "--targets" in bad.stderr and "one row of logits" in bad.stderr
    assert r["train"]["engine"] == "autograd"  # a 1k-wide student on digits: too small for the split step
    forced = CliRunner().invoke(cli, ["fit", "--data", str(f["x"]), "--targets", str(z), "--width", "1k",
                                      "--rank", "32", "--epochs", "3", "--engine", "split", "--json",
                                      "--out", str(tmp_path / "split")])
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["train"]["engine"] == "split"
    wrong = CliRunner().invoke(cli, ["fit", "--data", str(f["x"]), "--targets", str(z), "--engine", "fast"])
    assert wrong.exit_code == 2 and "--engine" in wrong.stderr
    if not torch.cuda.is_available():  # the CUDA-graph step asked for where there is no GPU
        graph = CliRunner().invoke(cli, ["fit", "--data", str(f["x"]), "--targets", str(z), "--epochs", "1",
                                         "--engine", "graph", "--out", str(tmp_path / "graph")])
        assert graph.exit_code == 2 and graph.stderr.count("\n") == 1, graph.output
        assert "--engine graph: only for training on one GPU" in graph.stderr
        assert not (tmp_path / "graph" / "student.onnx").exists()
        early = CliRunner().invoke(cli, ["distill", str(f["teacher"]), "--data", str(f["x"]), "--engine",
                                         "graph", "--out", str(tmp_path / "graph2")])
        assert early.exit_code == 2 and "--engine graph" in early.stderr  # refused before the teacher ran
        assert not (tmp_path / "graph2" / "targets.npy").exists()


def test_ctrl_c_during_fit_says_how_to_resume_and_resume_finishes(tmp_path):
    """A real SIGINT to `compress fit` once its first checkpoint is on disk: exit 130 within seconds
    and one line naming --resume and the checkpoint; the same command with --resume then finishes
    the remaining epochs from it."""
    import signal
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40_000, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "z.npy", np.tanh(x @ rng.standard_normal((64, 10), dtype=np.float32) / 8))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "compress", "fit", "--data", str(tmp_path / "x.npy"), "--targets",
           str(tmp_path / "z.npy"), "--width", "1k", "--rank", "16", "--epochs", "8", "--out", str(out),
           "--json"]
    ready = tmp_path / "ready"  # the first checkpoint is saved, and the run waits (tests/hooks.py)
    hooked = [sys.executable, "-m", "tests.hooks", "compress.checkpoint:save", "1", str(ready), "--",
              *cmd[3:]]
    proc = subprocess.Popen(hooked, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    wait_for(ready, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, stderr
    hint = f"Interrupted: the same command with --resume continues from {out / 'checkpoint.pt'}"
    assert stderr.strip().splitlines()[-1] == hint
    assert "Traceback" not in stderr and not stdout and not (out / "student.onnx").exists()

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    train = json.loads(resumed.stdout)["train"]
    assert train["resumed_from_epoch"] == 1
    assert [h["epoch"] for h in train["history"]] == list(range(1, 9))
    assert (out / "student.onnx").exists() and not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("command", ["targets", "distill"])
def test_ctrl_c_during_labelling_says_how_far_it_got(tmp_path, command):
    """A real SIGINT to `compress targets` (or `distill` in its labelling stage) once a chunk of logits
    is committed: exit 130 and one line saying how many rows are kept for the same command to
    continue from. The teacher (tests/gated_teacher.py) waits after its first chunk: no race."""
    import os
    import signal
    import subprocess
    import sys

    import torch

    from compress.targets import CHUNK_ROWS
    from tests.gated_teacher import make

    n = 3 * CHUNK_ROWS
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((n, 64), dtype=np.float32))
    torch.save(make().state_dict(), tmp_path / "t.pt")
    if command == "targets":
        out, args = tmp_path / "z.npy", ["--out", str(tmp_path / "z.npy")]
    else:
        out, args = tmp_path / "run" / "targets.npy", ["--out", str(tmp_path / "run")]
    progress = out.with_name(f".{out.name}.progress.json")
    proc = subprocess.Popen([sys.executable, "-m", "compress", command, str(tmp_path / "t.pt"), "--arch",
                             "tests.gated_teacher:make", "--data", str(tmp_path / "x.npy"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "GATE_AFTER_ROWS": str(CHUNK_ROWS)}, preexec_fn=sigint_default)
    wait_for(progress, proc, lambda p: json.loads(p.read_text())["done"] > 0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last == f"Interrupted: {CHUNK_ROWS:,} of {n:,} rows are labelled; the same command continues"
    assert not out.exists() and "Traceback" not in stderr


def wait_for(path, proc, ready=lambda p: True, hang_guard_s: float = 300):
    """Until `path` exists and `ready(path)`; fails if the process ends first. The time limit only
    guards against a hang: the process cannot pass the point the test waits for."""
    import time

    end = time.monotonic() + hang_guard_s
    while time.monotonic() < end and proc.poll() is None:
        try:
            if path.exists() and ready(path):
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    out = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
    raise AssertionError(f"the run ended (or hung) before {path.name}: {out[-2000:]}")


def test_resume_keeps_a_finished_run_of_the_same_inputs_and_options(tmp_path, digits_files):
    """distill --resume on a folder that holds this very run, finished, returns its report and
    leaves its files alone; another option, or a data file modified since, runs it again."""
    import os
    import shutil

    f = digits_files
    out, x = tmp_path / "run", shutil.copy(f["x"], tmp_path / "x.npy")  # a copy: its time is changed below
    args = ["distill", str(f["teacher"]), "--data", str(x), "--width", "64", "--rank", "0",
            "--epochs", "2", "--bench-seconds", "0.02", "--out", str(out), "--json"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    made = (out / "student.onnx").stat().st_mtime_ns
    assert json.loads(first.stdout)["run"]["options"]["fit"]["epochs"] == 2

    again = CliRunner().invoke(cli, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    kept = json.loads(again.stdout)
    assert kept["reused"] is True and f"Note: {out} holds this run, finished" in again.stderr
    assert {k: v for k, v in kept.items() if k != "reused"} == json.loads((out / "report.json").read_text())
    assert (out / "student.onnx").stat().st_mtime_ns == made

    other = CliRunner().invoke(cli, [*args[:-1], "--epochs", "3", "--json", "--resume"])
    assert other.exit_code == 0, other.output
    assert "reused" not in json.loads(other.stdout) and json.loads(other.stdout)["train"]["epochs"] == 3
    st = os.stat(x)  # the data file "changed" since: its key (size and modification time) differs
    os.utime(x, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    redone = CliRunner().invoke(cli, [*args[:-1], "--epochs", "3", "--json", "--resume"])
    assert redone.exit_code == 0 and "reused" not in json.loads(redone.stdout)
    assert json.loads(redone.stdout)["transfer"]["targets_cached"] is False
