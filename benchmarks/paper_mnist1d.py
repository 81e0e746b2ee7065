"""Ba & Caruana (2014) Table 1, on MNIST-1D (Greydanus 2020): do shallow nets need to be deep?

Everything on the standard split (4,000 training samples with labels, the standard 1,000 test samples):
- logistic regression (scikit-learn) and shallow nets of several widths trained on the 4,000 labels
  (cross-entropy, the toolkit's own fit loop with `loss="ce"`);
- the deep teacher: the bundled CNN (benchmarks/train_mnist1d_teacher.py), and an ensemble of it and
  4 more CNNs trained the same way with other seeds (the paper's ECNN);
- SNN-MIMIC students distilled through the toolkit's API (`compress.pipeline.distill`, default recipe)
  from the CNN and from the ensemble on 100,000 freshly generated unlabeled samples, with and without a
  bottleneck, and from the CNN on only the 4,000 training inputs (why the transfer set matters).

Gap recovered = (student - best shallow net on labels) / (teacher - best shallow net on labels).

    python benchmarks/paper_mnist1d.py          # ~10 minutes on 2 CPU cores
Writes benchmarks/results/mnist1d.{json,md,png}.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine, write_results  # noqa: E402
from benchmarks.train_mnist1d_teacher import ConvNet, export, train  # noqa: E402
from compress.demo import mnist1d, teacher_path  # noqa: E402
from compress.fit import FitConfig, fit  # noqa: E402
from compress.pipeline import DistillOptions, distill  # noqa: E402
from compress.student import StudentConfig, count_params  # noqa: E402

TRANSFER = 100_000
WIDTHS = (1000, 4000, 16000)


def accuracy_of(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).numpy().argmax(1) == y).mean())


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="paper-mnist1d-"))
    std = mnist1d()
    x, y, xt, yt = std["x"], std["y"], std["x_test"], std["y_test"]
    np.save(work / "train_x.npy", x)
    np.save(work / "test_x.npy", xt)
    np.save(work / "test_y.npy", yt)
    np.save(work / "transfer.npy", mnist1d(TRANSFER, 2024, 1.0)["x"])  # fresh, unlabeled
    rows: list[dict] = []

    def add(model: str, kind: str, params: int, acc: float, **more) -> None:
        rows.append({"model": model, "kind": kind, "params": params, "test_accuracy": acc, **more})
        print(json.dumps(rows[-1]), flush=True)

    lr = LogisticRegression(max_iter=2000).fit(x, y)
    add("logistic regression", "labels", 40 * 10 + 10, float(lr.score(xt, yt)))
    onehot = np.eye(10, dtype=np.float32)[y]
    for w in WIDTHS:
        t = time.perf_counter()
        cfg = StudentConfig((40,), 10, w, 0)
        res = fit(x[:3600], onehot[:3600], x[3600:], onehot[3600:], cfg, FitConfig(loss="ce"))
        add(f"shallow net {w:,} on labels", "labels", count_params(cfg), accuracy_of(res.model, xt, yt),
            width=w, seconds=time.perf_counter() - t)

    members = [teacher_path()]
    for seed in (1, 2, 3, 4):
        path = work / f"cnn{seed}.onnx"
        export(train(seed), path)
        members.append(path)
    cnn_params = sum(int(np.prod(p.shape)) for p in ConvNet().parameters())
    ens_acc = None
    opts = DistillOptions(latency_budget_s=0.05, latency_batches=(1,))
    for tag, teachers in (("CNN", [teacher_path()]), ("ECNN (5 CNNs)", members)):
        for w in WIDTHS:
            for rank in (0, 20):
                if tag.startswith("ECNN") and rank:
                    continue  # the ensemble's students: no-bottleneck widths only (time)
                t = time.perf_counter()
                r = distill(teachers, work / "transfer.npy",
                            DistillOptions(**{**opts.__dict__, "width": w, "rank": rank,
                                              "out_dir": str(work / f"{tag[:4]}_{w}_{rank}"),
                                              "cache_dir": str(work / tag[:4])}),
                            work / "test_x.npy", work / "test_y.npy")
                assert r is not None
                if tag == "CNN" and w == WIDTHS[0] and rank == 0:
                    add("CNN teacher", "teacher", cnn_params, r["teacher"]["accuracy"])
                if tag.startswith("ECNN") and ens_acc is None:
                    ens_acc = r["teacher"]["accuracy"]
                    add("ECNN teacher (5 CNNs)", "teacher", 5 * cnn_params, ens_acc,
                        members=[m["accuracy"] for m in r["teacher"]["members"]])
                add(f"SNN-MIMIC {w:,}" + (f", rank {rank}" if rank else "") + f" from {tag}", "mimic",
                    r["student"]["params"], r["student"]["accuracy"], width=w, rank=rank, teacher=tag,
                    agreement=r["fidelity"]["agreement"], transfer=TRANSFER - r["transfer"]["holdout"],
                    seconds=time.perf_counter() - t)
    r = distill([teacher_path()], work / "train_x.npy",
                DistillOptions(**{**opts.__dict__, "width": 4000, "rank": 0,
                                  "out_dir": str(work / "small")}),
                work / "test_x.npy", work / "test_y.npy")
    assert r is not None
    add("SNN-MIMIC 4,000 from CNN, only the 4,000 training inputs", "mimic-small", r["student"]["params"],
        r["student"]["accuracy"], width=4000, rank=0, teacher="CNN", agreement=r["fidelity"]["agreement"],
        transfer=r["transfer"]["real_train"])

    best_labels = max(r["test_accuracy"] for r in rows if r["kind"] == "labels" and r["params"] > 410)
    cnn = next(r["test_accuracy"] for r in rows if r["model"] == "CNN teacher")
    for r in rows:
        if r["kind"].startswith("mimic"):
            t_acc = cnn if r["teacher"] == "CNN" else ens_acc
            r["gap_recovered"] = (r["test_accuracy"] - best_labels) / (t_acc - best_labels)
    minutes = (time.perf_counter() - t_all) / 60
    result = {"machine": machine(), "transfer_samples": TRANSFER, "minutes": minutes,
              "best_shallow_on_labels": best_labels, "rows": rows}
    lines = ["# Do shallow nets need to be deep? MNIST-1D (Ba & Caruana 2014, Table 1)", "",
             f"Machine: {result['machine']}; whole benchmark {result['minutes']:.1f} min. Standard split: "
             f"4,000 labelled training samples, 1,000 test samples; SNN-MIMIC students on {TRANSFER:,} fresh "
             "unlabeled samples (90% for training) with the toolkit's default recipe. Gap recovered: "
             "(student - best shallow net on labels) / (its teacher - best shallow net on labels). "
             "One run each.",
             "", "| model | parameters | test accuracy | agreement with teacher | gap recovered |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        gap = f"{100 * r['gap_recovered']:.0f}%" if "gap_recovered" in r else ""
        agree = f"{100 * r['agreement']:.1f}%" if "agreement" in r else ""
        acc = 100 * r["test_accuracy"]
        lines.append(f"| {r['model']} | {r['params']:,} | {acc:.1f}% | {agree} | {gap} |")
    lines += ["", "![accuracy against parameters](mnist1d.png)"]
    write_results("mnist1d", result, lines, echo=False)
    figure(result, RESULTS / "mnist1d.png", cnn, ens_acc)
    print("\n".join(lines))


def figure(result: dict, path: Path, cnn: float, ens: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    curves = {
        "shallow nets on labels": [r for r in result["rows"] if r["kind"] == "labels" and "width" in r],
        "SNN-MIMIC from CNN": [r for r in result["rows"] if r["kind"] == "mimic" and r["teacher"] == "CNN"
                               and r["rank"] == 0],
        "SNN-MIMIC rank 20 from CNN": [r for r in result["rows"] if r["kind"] == "mimic"
                                       and r["teacher"] == "CNN" and r["rank"] == 20],
        "SNN-MIMIC from ECNN": [r for r in result["rows"] if r["kind"] == "mimic" and r["teacher"] != "CNN"],
    }
    for name, rs in curves.items():
        rs = sorted(rs, key=lambda r: r["params"])
        ax.plot([r["params"] for r in rs], [100 * r["test_accuracy"] for r in rs], marker="o",
                linestyle="--" if "labels" in name else "-", label=name)
    ax.axhline(100 * cnn, color="k", linestyle=":", label="CNN teacher")
    if ens is not None:
        ax.axhline(100 * ens, color="gray", linestyle=":", label="ECNN teacher")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST-1D: shallow mimic nets vs shallow nets on labels")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="center right")  # the space between the two groups of curves
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
