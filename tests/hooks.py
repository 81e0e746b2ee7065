"""Run the `compress` command line with a hook that stops it at a known point, so that tests signal
a run where they mean to instead of racing its clock.

    python -m tests.hooks MODULE:FUNCTION N READY -- compress arguments...

replaces MODULE.FUNCTION with a wrapper that, once the function has returned N times, creates the
file READY and then blocks (in time.sleep, where Ctrl-C lands as it would in a long step) until the
process is signalled. Only the test's process is changed; the library has no test hooks.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Any

# How long a test waits for a child process before calling it hung: a guard, not a timing assumption.
# 60 s ran out on a fresh clone's `make test` while two benchmarks shared this 2-core machine.
HANG_S = 600


def sigint_default() -> None:
    """Popen's preexec_fn for a child that a test interrupts with SIGINT: a shell runs background jobs
    (`make test &`, CI runners, nohup) with SIGINT ignored, children inherit that, and Python then never
    installs its KeyboardInterrupt handler; the child slept through the test's Ctrl-C until killed."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def block_after(target: str, calls: int, ready: Path) -> None:
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    count = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        result = original(*args, **kwargs)
        count += 1
        if count == calls:
            ready.touch()
            while True:
                time.sleep(1)
        return result

    setattr(module, name, wrapper)


if __name__ == "__main__":
    target, calls, ready, sep, *rest = sys.argv[1:]
    assert sep == "--", "usage: python -m tests.hooks MODULE:FUNCTION N READY -- args..."
    block_after(target, int(calls), Path(ready))
    from compress.cli import cli

    cli(rest, prog_name="compress")
