"""Shared fixtures and helpers of the tests in every folder below (test files import helpers from
here, never from one another): run the installed `suncet` command as a user would, in a real
process or in-process, and the file writers and checks that several test files use."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # numpy is imported where it is used: conftest loads before any test
    import numpy as np

REPO = Path(__file__).resolve().parents[1]
# The installed console script: `python -m` would put the working directory (the repository,
# whose suncet/ lacks the built extension and plugins) first on sys.path.
SUNCET = str(Path(sys.executable).parent / "suncet")


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [SUNCET, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


def start(*args, env=None):
    return subprocess.Popen(
        [SUNCET, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def wait_for_checkpoint(run, process, at_least=1, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        checkpoints = list((run / "checkpoints").glob("step-*.pt")) if (run / "checkpoints").exists() else []
        if len(checkpoints) >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError("the run ended before it could be interrupted")


# The flags of a small digits run that trains, checkpoints and monitors every epoch (tests/engine).
SMALL_TRAINING = (
    "--batch-size",
    "64",
    "--proj-hidden",
    "64",
    "--backbone-opt",
    "width=8",
    "--warmup-epochs",
    "1",
    "--final-eval",
    "none",
    "--monitor-every",
    "1",
)


# ---------------------------------------------------------------------------------------------
# Refusals: a command that must fail in one line and leave every file as it was.
SMALL = [
    "--batch-size",
    "64",
    "--proj-hidden",
    "64",
    "--epochs",
    "1",
    "--final-eval",
    "none",
    "--monitor-every",
    "0",
    "--backbone-opt",
    "width=8",
]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and link under ``root``: its content's hash (a link: where it points)."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = "link:" + os.readlink(path)
        elif path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[key] = "dir"
    return state


def refused(tmp_path: Path, arguments: list[str], expected: str, code: int = 2, env: dict | None = None) -> None:
    """Run ``suncet ARGS`` in-process from ``tmp_path``: one line with ``expected``, ``code``,
    no traceback, and no file under ``tmp_path`` created, changed or removed."""
    from click.testing import CliRunner

    from suncet.cli.main import main

    before = snapshot(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(main, arguments, env=env)
    finally:
        os.chdir(cwd)
    stderr = result.stderr
    assert result.exit_code == code, (result.exit_code, stderr, result.output[-2000:])
    assert expected in stderr, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Files in the formats suncet reads.
# CIFAR: python pickles of {'data': uint8 [N, 3072] (R, G, B planes), 'labels': [...]}.


def cifar_images(n: int, seed: int) -> np.ndarray:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def dump(path: Path, content: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=2)


def write_cifar10(root: Path, per_batch: int = 3) -> dict[str, np.ndarray]:
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = [], []
    for i in range(1, 6):
        x, y = cifar_images(per_batch, i), [(i + j) % 10 for j in range(per_batch)]
        dump(
            folder / f"data_batch_{i}",
            {
                "batch_label": f"training batch {i} of 5",
                "labels": y,
                "data": x.reshape(per_batch, -1),
                "filenames": [f"{i}_{j}.png" for j in range(per_batch)],
            },
        )
        images.append(x)
        labels += y
    test = cifar_images(4, 99)
    dump(folder / "test_batch", {"labels": [0, 1, 2, 3], "data": test.reshape(4, -1)})
    dump(folder / "batches.meta", {"label_names": [f"class{c}" for c in range(10)], "num_vis": 3072})
    return {"train": np.concatenate(images), "labels": np.array(labels), "test": test}


def install_fake_distribution(
    root: Path, name: str, group: str, entry_points: dict[str, str], modules: dict[str, str]
) -> None:
    """A real installed distribution, as importlib.metadata finds it: a dist-info on sys.path."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = [f"[{group}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


# ---------------------------------------------------------------------------------------------
# Non-finite inputs through the public losses, for every backend (the losses' tests run the cpu
# and reference backends, the kernels' tests the Triton interpreter).


def check_losses_keep_non_finite(backend):
    """A NaN or an inf anywhere in the projections makes every loss that reads the row, and its
    gradient, non-finite: the masked means must not hide it, even on a row without a positive."""
    import torch

    from suncet.losses import nt_xent, nt_xent_and_suncet, suncet_loss

    gen = torch.Generator().manual_seed(31)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])  # rows 4 and 5: singleton classes, no positive
    for value in (float("nan"), float("inf"), float("-inf")):
        for row in (1, 5):
            z_u = torch.randn(8, 6, generator=gen)
            z_l = torch.randn(6, 6, generator=gen)
            z_l[row, 2] = value
            z_l.requires_grad_(True)
            z_u.requires_grad_(True)
            suncet = suncet_loss(z_l, labels, backend=backend)
            assert not torch.isfinite(suncet), (backend, value, row)
            (grad,) = torch.autograd.grad(suncet, z_l)
            assert not torch.isfinite(grad).all(), (backend, value, row)
            _, both = nt_xent_and_suncet(z_u, z_l, labels, backend=backend)
            assert not torch.isfinite(both), (backend, value, row)
            z_u2 = z_u.detach().clone()
            z_u2[3, 0] = value
            assert not torch.isfinite(nt_xent(z_u2, backend=backend)), (backend, value)


def check_rows_that_see_a_non_finite_row_are_nan(backend):
    """docs/kernels.md, non-finite inputs: through the losses (which normalise first, so an inf
    becomes NaN), every row that sees a non-finite row, and that row itself, has a NaN loss on
    every backend; the cpu and cuda backends make every row NaN."""
    import torch

    from suncet.kernels.reference import allowed_and_positive
    from suncet.losses import contrastive_loss

    gen = torch.Generator().manual_seed(5)
    rows, keys = 40, torch.arange(40) % 5
    groups = (torch.arange(40) >= 20).long()
    for value in (float("nan"), float("inf"), float("-inf")):
        for towers in (1, 2):
            q, k = torch.randn(rows, 8, generator=gen), torch.randn(rows, 8, generator=gen)
            (q if towers == 1 else k)[33, 2] = value
            columns = None if towers == 1 else k
            loss, _ = contrastive_loss(
                q,
                keys,
                k=columns,
                col_keys=None if towers == 1 else keys,
                row_groups=groups,
                col_groups=None if towers == 1 else groups,
                self_offset=0 if towers == 1 else rows,
                tau=0.1,
                backend=backend,
            )
            allowed, _ = allowed_and_positive(keys, keys, groups, groups, 0 if towers == 1 else rows)
            sees = allowed[:, 33].clone()
            sees[33] |= towers == 1
            assert torch.isnan(loss[sees]).all(), (backend, value, towers)
            if backend in ("cpu", "cuda"):
                assert torch.isnan(loss).all(), (backend, value, towers)


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
        pytest.skip(
            "triton runs compiled here (TRITON_INTERPRET unset): a test of this file reruns these in an interpreting subprocess"
        )


def rerun_under_triton_interpreter(test_file: str, selection: str, passed: int) -> None:
    """Run the ``selection`` of ``test_file`` in a process with TRITON_INTERPRET=1; all ``passed``."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU the Triton kernels are checked compiled, by the gpu tests")
    pytest.importorskip("triton")
    if triton_interpreting():
        pytest.skip("this process interprets triton: the interpreter tests ran here")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection]
    # From the test file's folder, so that `python -m` does not put the repository's unbuilt
    # suncet/ first on the path.
    proc = subprocess.run(
        command,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=os.path.dirname(test_file),
        capture_output=True,
        text=True,
        timeout=600,
    )
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
TINY_RUN = (
    "--batch-size",
    "64",
    "--proj-hidden",
    "64",
    "--epochs",
    "1",
    "--final-eval",
    "none",
    "--monitor-every",
    "1",
    "--backbone-opt",
    "width=8",
    "--labels",
    "10%",
)


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
