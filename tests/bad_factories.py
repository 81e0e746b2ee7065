"""`--arch` factories that misbehave, for the contract tests."""

from __future__ import annotations


def exits():  # a factory that ends the process "successfully": must not look like a finished run
    raise SystemExit(0)


def not_a_module():
    return 42
