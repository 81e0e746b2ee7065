"""What every benchmark shares: where results go, the machine they ran on, and how they are written."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """The CPU's model name, its core count and onnxruntime's version."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, onnxruntime {ort.__version__}"


def write_results(stem: str | Path, record: Any, lines: list[str], echo: bool = True) -> None:
    """`record` as <stem>.json and `lines` as <stem>.md (a name, str, goes into benchmarks/results/; a
    Path is where it says), each written whole under a temporary name first; with `echo`, the markdown
    is printed too."""
    stem = stem if isinstance(stem, Path) else RESULTS / stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(record, indent=2) + "\n"), (".md", "\n".join(lines) + "\n")):
        path = stem.parent / (stem.name + suffix)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    if echo:
        print("\n".join(lines))
