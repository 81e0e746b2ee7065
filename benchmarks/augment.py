"""What synthetic transfer data buys: each method and factor, with few and with many real samples.

Teachers: a CNN trained on digits (scikit-learn, 1,200 training images, scored on the other 597), and
the bundled MNIST-1D CNN (scored on the standard 1,000 test samples). Real transfer samples: digits
100 and 1,080; MNIST-1D 400 and 4,000 (fresh samples, not the teacher's training set). Each run is
`compress distill` through the library with the defaults, width 2k, rank 32 (digits) or 0 (MNIST-1D,
40 inputs), `--augment METHOD:FACTOR` for FACTOR in 5 and 20. Student test accuracy is reported.

    python benchmarks/augment.py
Writes benchmarks/results/augment.{json,md}.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_results  # noqa: E402
from compress.demo import mnist1d, teacher_path  # noqa: E402
from compress.pipeline import DistillOptions, distill  # noqa: E402

SPECS = [None, "munge:5", "munge:20", "noise:5", "noise:20", "mixup:5", "mixup:20"]


def digits_problem(work: Path) -> dict:
    from sklearn.datasets import load_digits

    from tests.conftest import DigitsCNN, export_teacher, train_classifier

    d = load_digits()
    x, y = (d.data / 16).astype(np.float32), d.target
    p = np.random.default_rng(0).permutation(len(y))
    x, y = x[p], y[p]
    teacher = export_teacher(train_classifier(DigitsCNN(), x[:1200], y[:1200]), x, work / "digits.onnx")
    np.save(work / "d_test_x.npy", x[1200:])
    np.save(work / "d_test_y.npy", y[1200:])
    for n in (100, 1200):  # 1,200 -> 1,080 after the 10% held out
        np.save(work / f"d_{n}.npy", x[:n])
    return {"name": "digits", "teacher": teacher, "sizes": (100, 1200), "rank": 32,
            "test": (work / "d_test_x.npy", work / "d_test_y.npy"), "data": lambda n: work / f"d_{n}.npy"}


def mnist1d_problem(work: Path) -> dict:
    std = mnist1d()
    np.save(work / "m_test_x.npy", std["x_test"])
    np.save(work / "m_test_y.npy", std["y_test"])
    fresh = mnist1d(4000, 99, 1.0)["x"]
    for n in (400, 4000):
        np.save(work / f"m_{n}.npy", fresh[:n])
    return {"name": "mnist1d", "teacher": teacher_path(), "sizes": (400, 4000), "rank": 0,
            "test": (work / "m_test_x.npy", work / "m_test_y.npy"), "data": lambda n: work / f"m_{n}.npy"}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="augment-"))
    rows = []
    for prob in (digits_problem(work), mnist1d_problem(work)):
        for n in prob["sizes"]:
            for spec in SPECS:
                t = time.perf_counter()
                opts = DistillOptions(width=2000, rank=prob["rank"], augment=spec, latency_budget_s=0.05,
                                      out_dir=str(work / f"{prob['name']}_{n}_{spec}"))
                r = distill([prob["teacher"]], prob["data"](n), opts, *prob["test"])
                rows.append({"problem": prob["name"], "real": r["transfer"]["real_train"],
                             "augment": spec or "none", "synthetic": r["transfer"]["synthetic"],
                             "teacher_accuracy": r["teacher"]["accuracy"],
                             "student_accuracy": r["student"]["accuracy"],
                             "agreement": r["fidelity"]["agreement"], "seconds": time.perf_counter() - t})
                print(json.dumps(rows[-1]), flush=True)
    lines = ["# Synthetic transfer data: student test accuracy", "", f"Machine: {machine()}. Width 2,000; "
             "defaults otherwise; one run each (run-to-run spread is about a point on digits).", "",
             "| problem | real training samples | teacher | none | " + " | ".join(SPECS[1:]) + " |",
             "|---|---:|---:|" + "---:|" * len(SPECS)]
    for key in dict.fromkeys((r["problem"], r["real"]) for r in rows):
        runs = {r["augment"]: r for r in rows if (r["problem"], r["real"]) == key}
        cells = [f"{100 * runs[s or 'none']['student_accuracy']:.1f}%" for s in SPECS]
        lines.append(f"| {key[0]} | {key[1]:,} | {100 * runs['none']['teacher_accuracy']:.1f}% | "
                     + " | ".join(cells) + " |")
    write_results("augment", {"machine": machine(), "runs": rows}, lines)


if __name__ == "__main__":
    main()
