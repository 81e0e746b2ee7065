"""The CLI's ways of failing: one line and exit status 2 for a bad input (`OneLineErrors`), and Ctrl-C
or SIGTERM as exit status 130 with a line that says how to continue what the run saved
(`on_interrupt`, `resume_hint`)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from compress.atomic import STORAGE_ERRNOS
from compress.cli.options import is_main_rank
from compress.errors import CompressError


class OneLineErrors(click.Group):
    """Errors as one line on stderr: `Error: ...`, exit status 2, no traceback, no usage dump."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        _terminate_like_ctrl_c()
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            click.echo(f"Error: {e.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(2)
        except CompressError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)
        except OSError as e:  # a write the library did not name: still the user's disk, not our bug
            if e.errno not in STORAGE_ERRNOS:
                raise
            click.echo(f"Error: {e.filename or 'writing'}: {e.strerror}", err=True)
            sys.exit(2)
        sys.exit(rv if isinstance(rv, int) else 0)


def _terminate_like_ctrl_c() -> None:
    """SIGTERM (`kill`, a job scheduler's stop) unwinds like Ctrl-C: locks and temporary files are
    removed and the same one-line hint is printed, instead of dying where it stands."""
    import signal
    import threading

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def on_interrupt(hint: Callable[[float], str | None]) -> Iterator[None]:
    """Ctrl-C: `hint(start time)` (how to continue what this run saved) as one line, exit status 130;
    with no hint, click's "Aborted."."""
    started = time.time()
    try:
        yield
    except KeyboardInterrupt:
        line = hint(started) if is_main_rank() else None
        if not line:
            raise
        click.echo(f"\nInterrupted: {line}", err=True)
        raise click.exceptions.Exit(130) from None


def newer(path: Path, started: float) -> bool:
    """Whether `path` was written since `started` (a missing file was not)."""
    try:
        return path.stat().st_mtime >= started
    except OSError:
        return False


def labelled_hint(cache: Path, started: float) -> str | None:
    """Ctrl-C while labelling into `cache`: how many rows this run has kept for the next one."""
    from compress.targets import labelled_so_far

    so_far = labelled_so_far(cache, started)
    return so_far and f"{so_far[0]:,} of {so_far[1]:,} rows are labelled; the same command continues"


def resume_hint(out_dir: Path, cache: Path | None = None) -> contextlib.AbstractContextManager[None]:
    """Ctrl-C after this run saved a checkpoint: say that --resume continues from it; before that,
    while labelling into `cache`, how many rows are labelled (the next run starts from them)."""
    ck = out_dir / "checkpoint.pt"

    def hint(started: float) -> str | None:
        if newer(ck, started):
            return f"the same command with --resume continues from {ck}"
        return labelled_hint(cache, started) if cache is not None else None

    return on_interrupt(hint)
