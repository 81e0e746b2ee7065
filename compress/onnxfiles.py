"""An ONNX model's files on disk: the model and the weight files it names beside it.

Below both the teachers (which measure the file they load) and the exporters (which write, move and
measure the files they make), so that neither stage imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx


def external_files(path: str | Path, model: onnx.ModelProto | None = None) -> list[Path]:
    """The weight files an ONNX model names, beside it (none for a self-contained model). `model`:
    the file already loaded (without its external data)."""
    import onnx

    path = Path(path)
    if model is None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - no file, or not an ONNX model: it names no weight files
            return []
    graph = model.graph
    names = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    return [path.parent / n for n in sorted(names)]


def onnx_size(path: str | Path, model: onnx.ModelProto | None = None) -> int:
    """Bytes of the model file and of the weight files it names (those that are there). `model`: the
    file already loaded (without its external data)."""
    files = external_files(path, model)
    return Path(path).stat().st_size + sum(f.stat().st_size for f in files if f.is_file())
