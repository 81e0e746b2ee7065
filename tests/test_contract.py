"""Issue 17: the command-line contract, table-driven. Every bad command line below exits 2 with one
`Error:` line that names the option or file, no traceback, leaves no new file anywhere in the
working folder, and leaves every input byte-identical (hashes before and after)."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from compress.cli import cli
from tests.hooks import HANG_S, sigint_default


@pytest.fixture(scope="module")
def workdir_template(tmp_path_factory, digits_files):
    """A folder as a user has it: a teacher, data, labels, a finished run, and some traps."""
    root = tmp_path_factory.mktemp("contract")
    shutil.copy(digits_files["teacher"], root / "t.onnx")
    for k in ("x", "y", "x_test", "y_test"):
        shutil.copy(digits_files[k], root / f"{k}.npy")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        r = CliRunner().invoke(cli, ["distill", "t.onnx", "--data", "x.npy", "--width", "32", "--rank",
                                     "0", "--epochs", "1", "--bench-seconds", "0.01", "--out", "run"])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    (root / "run" / "targets.npy").unlink()  # a user's data file may carry this name: see below
    shutil.copy(root / "x.npy", root / "run" / "targets.npy")
    (root / "afile").write_text("a file, not a folder\n")
    (root / "junk.pt").write_bytes(b"not a checkpoint")
    np.save(root / "y_big.npy", np.full(1200, 12, np.int64))  # classes the teacher does not have
    np.save(root / "x_nan.npy", np.full((20, 64), np.nan, np.float32))
    onnx_models(root)
    import torch

    payload = torch.load(root / "run" / "student.pt", weights_only=True)
    torch.save({**payload, "format": "compress-student/99"}, root / "future.pt")
    torch.save({k: v for k, v in payload.items() if k != "state_dict"}, root / "noweights.pt")
    torch.save(torch.nn.Linear(64, 10).state_dict(), root / "sd.pt")
    return root


def onnx_models(root: Path) -> None:
    """Models bench cannot time: two inputs, an int64 input, no shape, no batch axis, one that fails."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper

    def save(name, inputs, nodes, output_shape, inits=()):
        graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", T.FLOAT,
                                                                                     output_shape)],
                                  initializer=list(inits))
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.save(m, str(root / name))

    vi = helper.make_tensor_value_info
    save("two.onnx", [vi("a", T.FLOAT, ["N", 4]), vi("b", T.FLOAT, ["N", 4])],
         [helper.make_node("Add", ["a", "b"], ["y"])], ["N", 4])
    save("int64.onnx", [vi("a", T.INT64, ["N", 4])], [helper.make_node("Cast", ["a"], ["y"], to=T.FLOAT)],
         ["N", 4])
    save("noshape.onnx", [vi("a", T.FLOAT, None)], [helper.make_node("Relu", ["a"], ["y"])], None)
    save("nobatch.onnx", [vi("a", T.FLOAT, [4])], [helper.make_node("Relu", ["a"], ["y"])], [4])
    save("fails.onnx", [vi("a", T.FLOAT, ["N", 4])], [helper.make_node("Reshape", ["a", "s"], ["y"])], None,
         [onnx.numpy_helper.from_array(np.array([3, 7], np.int64), "s")])


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_fifo():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir() or p.is_fifo():
            out[str(p.relative_to(root))] = "folder" if p.is_dir() else "fifo"
    return out


# (command line, a token the one error line must contain)
BAD = [
    # data loss: an output over an input of the same command
    ("targets t.onnx --data x.npy --out x.npy", "--data x.npy"),
    ("distill t.onnx --data run/targets.npy --out run", "--data run/targets.npy"),
    ("export run/student.pt --out run/student.pt", "STUDENT run/student.pt"),
    ("distill run/student.onnx --data x.npy --out run", "TEACHER run/student.onnx"),
    ("sweep t.onnx --data run/targets.npy --out run", "--data run/targets.npy"),
    ("fit --data x.npy --targets run/report.json --width 16 --out run", "--targets run/report.json"),
    # numbers out of range
    ("targets t.onnx --data x.npy --out z.npy --batch-size 0", "--batch-size"),
    ("targets t.onnx --data x.npy --out z.npy --batch-size -1", "--batch-size"),
    ("distill t.onnx --data x.npy --seed -1", "--seed"),
    ("distill t.onnx --data x.npy --seed 99999999999999999999", "--seed"),
    ("distill t.onnx --data x.npy --lr inf", "--lr"),
    ("distill t.onnx --data x.npy --lr nan", "--lr"),
    ("distill t.onnx --data x.npy --lr 1e6", "--lr"),
    ("distill t.onnx --data x.npy --loss kl --temperature 0", "--temperature"),
    ("distill t.onnx --data x.npy --loss kl --temperature 1e-30", "--temperature"),
    ("distill t.onnx --data x.npy --loss kl --temperature -1", "--temperature"),
    ("distill t.onnx --data x.npy --epochs 100000000", "--epochs"),
    ("distill t.onnx --data x.npy --epochs 0", "--epochs"),
    ("distill t.onnx --data x.npy --bench-seconds 0", "--bench-seconds"),
    ("distill t.onnx --data x.npy --min-agreement 2", "--min-agreement"),
    ("fit --data x.npy --targets x.npy --batch-size 0", "--batch-size"),
    ("bench t.onnx --threads 100000", "--threads"),
    ("bench t.onnx --seconds -1", "--seconds"),
    ("bench t.onnx --batch-sizes 100000000", "--batch-sizes"),
    ("compare t.onnx run/student.onnx --data x_test.npy --batch-sizes 100000000", "--batch-sizes"),
    ("demo --transfer 0", "--transfer"),
    ("demo --transfer -5", "--transfer"),
    ("demo --transfer 100000000000", "--transfer"),
    # refused before the long work
    ("sweep t.onnx --data x.npy --ranks 0,65 --out s", "--ranks"),
    ("sweep t.onnx --data x.npy --train-labels nope.npy --out s", "--train-labels"),
    ("sweep t.onnx --data x.npy --train-labels y_big.npy --out s", "--train-labels"),
    ("sweep t.onnx --data x.npy --train-labels y_test.npy --out s", "--train-labels"),
    ("distill t.onnx --data x.npy --device cuda --out d", "--device"),
    ("targets t.onnx --data x.npy --device cuda --out z.npy", "--device"),
    ("distill t.onnx --data x.npy --width 400M --rank 32 --out d", "--width"),
    ("fit --data x.npy --targets run/report.json --out d", "--targets"),
    ("sweep t.onnx --data x.npy --widths 400M --out s", "--widths"),
    ("demo --width 400M --transfer 1000 --out run", "--width"),
    # students in the paper's notation
    ("distill t.onnx --data x.npy --student 64c-8k-p --out d", "'8k'"),
    ("distill t.onnx --data x.npy --student x-8k --out d", "'x'"),
    ("distill t.onnx --data x.npy --student 8c-p128-1k --out d", "'p128'"),
    ("distill t.onnx --data x.npy --student 64c4-8k --out d", "'64c4'"),
    ("distill t.onnx --data x.npy --student 250L-8k --width 8k --out d", "--student"),
    ("distill t.onnx --data x.npy --student 100L-8k --out d", "--student 100L-8k"),
    ("fit --data x.npy --targets x.npy --student 16L-64 --rank 3 --out d", "--student"),
    ("sweep t.onnx --data x.npy --students 8c-p-1k,p-p --out s", "--student p-p"),
    ("demo --student 8c-p-1k --width 2k --out run", "--student"),
    ("demo --student 8c-1k-p --out run", "'1k'"),
    ("demo --student 8c-p-400M --transfer 1000 --out run", "--student 8c-p-400M"),
    ("distill t.onnx --data x.npy --student 400M --out d", "--student 400M"),
    ("fit --data x.npy --targets x.npy --student 400M --out d", "--student 400M"),
    ("sweep t.onnx --data x.npy --students 1k,8c-p-400M --out s", "--students 8c-p-400M"),
    # models bench cannot time, student files that are not what they claim, factories that misbehave
    ("bench two.onnx --seconds 0.05", "two.onnx"),
    ("bench int64.onnx --seconds 0.05", "int64.onnx"),
    ("bench noshape.onnx --seconds 0.05", "noshape.onnx"),
    ("bench nobatch.onnx --seconds 0.05", "nobatch.onnx"),
    ("bench fails.onnx --seconds 0.05", "fails.onnx"),
    ("export future.pt --out e.onnx", "compress-student/99"),
    ("export noweights.pt --out e.onnx", "no state_dict"),
    ("distill sd.pt --data x.npy --arch tests.bad_factories:exits --out d", "SystemExit"),
    ("distill sd.pt --data x.npy --arch tests.bad_factories:not_a_module --out d", "--arch"),
    ("distill t.onnx --data x.npy --key a --out d", "--key"),
    ("targets t.onnx --data x.npy --key a --out z.npy", "--key"),
    # names
    ("fit --data x.npy --targets x.npy --input-name '' --out d", "--input-name"),
    ("fit --data x.npy --targets x.npy --input-name a --output-name a --out d", "--output-name"),
    # files that are not what they should be
    ("export junk.pt --out e.onnx", "junk.pt"),
    ("export run/student.pt --out e.onnx --precision fp16,int8", "--precision"),
    ("export run/student.pt --out run", "--out"),
    ("export run/student.pt --out afile/e.onnx", "afile/e.onnx"),
    ("export run/student.pt --out e.onnx --quantize static", "--quantize"),
    ("targets t.onnx --data x.npy --out afile/z.npy", "afile"),
    ("targets t.onnx --data fifo.npy --out z.npy", "fifo.npy"),
    ("targets t.onnx --data x.npy --out z.txt", "--out"),
    ("distill t.onnx --data x.npy --out afile", "--out afile"),
    ("distill t.onnx --data x.npy --arch a:b --out d", "--arch"),
    ("distill t.onnx --data x.npy --quantize static --out d", "--quantize"),
    ("distill t.onnx --data x.npy --eval-labels y_test.npy --out d", "--eval-labels"),
    ("compare t.onnx run/student.onnx --data x_test.npy --labels y_big.npy", "--labels"),
    ("compare t.onnx junk.pt --data x_test.npy", "STUDENT junk.pt"),
    ("compare t.onnx run/student.onnx --data x_nan.npy", "NaN"),
    ("inspect afile", "afile"),
    ("inspect junk.pt", "junk.pt"),
    ("inspect x.npy", "x.npy"),
    ("inspect nope.onnx", "nope.onnx"),
]
if hasattr(os, "geteuid") and os.geteuid() == 0 and Path("/proc/self").exists():
    BAD += [("targets t.onnx --data x.npy --out /proc/z.npy", "/proc"),
            ("sweep t.onnx --data x.npy --out /proc/x", "/proc"),
            ("demo --out /proc/x", "/proc")]


@pytest.mark.parametrize("line,names", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path, workdir_template, line, names):
    root = tmp_path / "w"
    shutil.copytree(workdir_template, root, symlinks=True)
    os.mkfifo(root / "fifo.npy")  # a pipe: opening it for reading would wait for a writer forever
    before = snapshot(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        r = CliRunner().invoke(cli, shlex.split(line))
    finally:
        os.chdir(cwd)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: ") and names in lines[-1], r.stderr
    assert sum(x.startswith("Error: ") for x in lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert snapshot(root) == before  # no input changed, nothing new (no half-written or hidden file)


def test_a_diverging_run_stops_with_one_line_and_writes_no_student(tmp_path, digits_files):
    """--lr is capped at 1 on the command line; a library caller can still ask for 1e30, and the run
    must stop at the first non-finite epoch without a student (exit 2 through the CLI's handler)."""
    from compress.errors import DivergedError
    from compress.fit import FitConfig
    from compress.pipeline import DistillOptions, distill

    opts = DistillOptions(width=32, rank=0, out_dir=str(tmp_path / "run"), latency_budget_s=0.01,
                          fit=FitConfig(epochs=3, lr=1e30))
    with pytest.raises(DivergedError, match="--lr: training diverged at epoch 1"):
        distill([digits_files["teacher"]], digits_files["x"], opts)
    left = {p.name for p in (tmp_path / "run").iterdir()}
    assert not left & {"student.onnx", "student.pt", "report.json", "checkpoint.pt"}, left


def test_json_never_holds_nan():
    import json

    from compress import jsonio

    text = jsonio.dumps({"rmse": float("nan"), "p99": [1.0, float("inf")], "ok": 0.5})
    assert json.loads(text) == {"rmse": None, "p99": [1.0, None], "ok": 0.5}
    assert "NaN" not in text and "Infinity" not in text


def test_sigterm_unwinds_like_ctrl_c(tmp_path):
    """SIGTERM to a labelling run held at a known point (tests/gated_teacher.py): exit 130, the hint
    line, and no lock or temporary file left beside the cache."""
    import signal
    import subprocess
    import sys

    import torch

    from compress.targets import CHUNK_ROWS
    from tests.gated_teacher import make
    from tests.test_distill import wait_for

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3 * CHUNK_ROWS, 64),
                                                                         dtype=np.float32))
    torch.save(make().state_dict(), tmp_path / "t.pt")
    proc = subprocess.Popen([sys.executable, "-m", "compress", "targets", str(tmp_path / "t.pt"), "--arch",
                             "tests.gated_teacher:make", "--data", str(tmp_path / "x.npy"), "--out",
                             str(tmp_path / "z.npy")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "GATE_AFTER_ROWS": str(CHUNK_ROWS)},
                            preexec_fn=sigint_default)
    progress = tmp_path / ".z.npy.progress.json"
    wait_for(progress, proc, lambda p: __import__("json").loads(p.read_text())["done"] > 0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("Interrupted: 16,384 of")
    left = {p.name for p in tmp_path.iterdir()}
    assert ".z.npy.lock" not in left and not any(".tmp-" in n for n in left), left


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here: gpu-check would run")
def test_gpu_check_without_a_gpu_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    before = snapshot(Path(__file__).parents[1] / "benchmarks" / "results")
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "Error: gpu-check: torch sees no CUDA GPU here (torch.cuda.is_available() is False); run it on a "
        "GPU machine"], r.stderr
    assert snapshot(Path(__file__).parents[1] / "benchmarks" / "results") == before
