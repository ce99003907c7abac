"""`suncet bench`: micro-benchmarks (kernels; data in a later issue)."""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Benchmarks that print a table and can write JSON."""
