"""Nothing half-written under a final name: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[str]:
    """Yield a temporary path beside `final`; on success rename it to `final`, on error remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield str(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
