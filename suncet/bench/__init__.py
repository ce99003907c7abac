"""Micro-benchmarks shipped with the package (`suncet bench ...`)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_report(path: str | Path, report: dict) -> None:
    """Write ``report`` as JSON to ``path`` through a temporary file: a run stopped mid-write
    (a device run reaching its time cap) leaves the previous, whole file."""
    partial = Path(f"{path}.partial")
    partial.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(partial, path)
