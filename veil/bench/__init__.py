"""veil's benchmarks (`veil bench …` and `python -m veil.bench.<suite>`)."""

from __future__ import annotations


def split_argv(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """A suite module's command line: its positional arguments, and its `--name=value` options
    (bare `--flags` are left for the caller to test with `in argv`)."""
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    return [a for a in argv if not a.startswith("--")], opts
