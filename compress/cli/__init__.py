"""The command line: thin click commands over the library. Heavy imports happen inside commands,
so `compress --help` answers without loading torch."""

from compress.cli.main import cli, main

__all__ = ["cli", "main"]
