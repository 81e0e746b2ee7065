"""The report's figure: accuracy and latency against parameters, for the teacher, the student and its
exports. Needs matplotlib (installed with compress); without it the report says how to get it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MISSING = "matplotlib is not installed; `pip install matplotlib` and run again for report.png"


def series(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per model: name, parameters, accuracy (or agreement when there are no labels),
    and batch-1 / largest-batch p50 latency."""
    points = [("teacher", report["teacher"], None), ("student", report["student"],
                                                     report["fidelity"]["agreement"])]
    points += [(f"student {e['precision']}", e, e.get("agreement")) for e in report.get("exports", [])]
    out = []
    for name, m, agree in points:
        lat = m.get("latency_ms", {})
        big = max(lat, key=int) if lat else None
        acc = m.get("accuracy")
        out.append({"name": name, "params": m.get("params") or report["student"]["params"],
                    "size_bytes": m["size_bytes"],
                    "score": acc if acc is not None else (1.0 if name == "teacher" else agree),
                    "latency_1": lat.get("1", {}).get("p50"), "latency_big": lat[big]["p50"] if big else None,
                    "big_batch": big})
    return out


def plot_report(report: dict[str, Any], path: str | Path) -> list[str]:
    """Write the figure to `path` (PNG); return the names of the plotted series.

    Panels: accuracy against parameters, p50 latency against parameters (batch 1 filled, the
    largest batch hollow), and file size per model (the exports share a parameter count, so size
    is where they differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    from compress.atomic import atomic_path

    pts = series(report)
    labelled = report["teacher"].get("accuracy") is not None
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(pts):
        c, mk = colors[i % len(colors)], "s" if p["name"] == "teacher" else "o" if i == 1 else "^"
        ax1.scatter(p["params"], 100 * p["score"], marker=mk, s=70, color=c, label=p["name"], zorder=3)
        ax1.annotate(f"{100 * p['score']:.2f}%", (p["params"], 100 * p["score"]), fontsize=7,
                     xytext=(6, 6 - 9 * i), textcoords="offset points")
        if p["latency_1"] is not None:
            ax2.scatter(p["params"], p["latency_1"], marker=mk, s=70, color=c, zorder=3,
                        label=f"{p['name']}, batch 1")
        if p["latency_big"] is not None and p["big_batch"] != "1":
            ax2.scatter(p["params"], p["latency_big"], marker=mk, s=70, facecolors="none", edgecolors=c,
                        zorder=3, label=f"{p['name']}, batch {p['big_batch']}")
        ax3.barh(i, p["size_bytes"] / 1e3, color=c)
        ax3.annotate(f"{p['size_bytes'] / 1e3:,.0f} kB", (p["size_bytes"] / 1e3, i), fontsize=8,
                     xytext=(4, -3), textcoords="offset points")
    ax1.set_ylabel("test accuracy (%)" if labelled else "agreement with teacher (%)")
    ax1.set_title("accuracy against parameters")
    ax1.legend(fontsize=8, loc="lower right")
    ax2.set_yscale("log")
    ax2.set_ylabel("p50 latency per call (ms)")
    ax2.set_title(f"latency, onnxruntime {report.get('latency_provider', '')}".strip())
    ax2.legend(fontsize=7, loc="center", framealpha=0.7)  # between the teacher and the students
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
        lo, hi = min(p["params"] for p in pts), max(p["params"] for p in pts)
        ax.set_xlim(lo / 2, hi * 2)
    ax3.set_yticks(range(len(pts)), [p["name"] for p in pts])
    ax3.invert_yaxis()
    ax3.set_xlabel("file size (kB)")
    ax3.set_title("file size")
    ax3.set_xlim(0, max(p["size_bytes"] for p in pts) / 1e3 * 1.3)
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return [p["name"] for p in pts]
