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


# ---------------------------------------------------------------------------------------------
# Triton kernels on CPU-only machines: the interpreter, which triton picks when triton.language
# is first imported (TRITON_INTERPRET=1 set before the process started).


def triton_interpreting() -> bool:
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.min, InterpretedFunction)


def skip_unless_triton_interpreter() -> None:
    """For tests of Triton kernels in the interpreter: skip where that is not how they run."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU the Triton kernels are checked compiled, by the gpu tests")
    pytest.importorskip("triton")
    if not triton_interpreting():
        pytest.skip("triton runs compiled here (TRITON_INTERPRET unset): the *_in_subprocess test runs these")


def rerun_under_triton_interpreter(test_file: str, selection: str, passed: int) -> None:
    """Run the ``selection`` of ``test_file`` in a process with TRITON_INTERPRET=1; all ``passed``."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU the Triton kernels are checked compiled, by the gpu tests")
    pytest.importorskip("triton")
    if triton_interpreting():
        pytest.skip("this process interprets triton: the interpreter tests ran here")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection]
    # From tests/, so that `python -m` does not put the repository's unbuilt suncet/ first on the path.
    proc = subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=os.path.dirname(test_file),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.splitlines()[-1]
    assert f"{passed} passed" in summary and "skipped" not in summary, proc.stdout[-2000:]


def _widen_half_precision_dots() -> None:
    """Triton 3.8's CPU interpreter multiplies bf16 ``tl.dot`` operands as their raw 16-bit
    patterns (NumPy keeps bf16 as uint16): a 16 x 16 product comes out off by about 2.4e10. A
    tensor core widens bf16 and fp16 operands exactly and accumulates in fp32; so does this
    shim, on the test side only, so that half-precision kernels can be checked here."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "widens_half_precision", False):
        return

    def widened(handle):
        if handle.dtype == tl.bfloat16:
            wide = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(wide.reshape(handle.data.shape), tl.float32)
        if handle.dtype == tl.float16:
            return interpreter.TensorHandle(handle.data.astype(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    create_dot.widens_half_precision = True
    interpreter.InterpreterBuilder.create_dot = create_dot


def pytest_configure(config) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            _widen_half_precision_dots()
        except ImportError:  # no triton: its tests skip themselves
            pass


# ---------------------------------------------------------------------------------------------
# One small finished run (1 epoch of digits, a kNN monitor), trained once per session; tests
# that damage or extend a run work on their own copy (``copy_of_finished_run``).
TINY_RUN = ("--batch-size", "64", "--proj-hidden", "64", "--epochs", "1", "--final-eval", "none",
            "--monitor-every", "1", "--backbone-opt", "width=8", "--labels", "10%")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    done = run_cli("train", *TINY_RUN, "--out", str(run))
    assert done.returncode == 0, done.stderr
    return run


@pytest.fixture
def copy_of_finished_run(finished_run, tmp_path):
    """``copy_of_finished_run(name)``: a copy of the finished run at tmp_path/name."""
    import shutil

    def copy(name: str = "run") -> Path:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(finished_run, target, symlinks=True)
        return target

    return copy
