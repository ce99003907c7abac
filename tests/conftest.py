"""Shared helpers: run the installed `suncet` command as a user would, in a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The installed console script: `python -m` would put the working directory (the repository,
# whose suncet/ lacks the built extension and plugins) first on sys.path.
SUNCET = str(Path(sys.executable).parent / "suncet")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [SUNCET, *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli
