"""Stop requests as schedulers and terminals send them, to real processes: SIGTERM to the whole
process group with loader workers (SLURM's preemption), and signals from a command's first
instant (start-up, plugin loading) to every command."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import SUNCET

SMALL = (
    "--batch-size",
    "64",
    "--proj-hidden",
    "64",
    "--backbone-opt",
    "width=8",
    "--final-eval",
    "none",
    "--monitor-every",
    "0",
    "--seed",
    "3",
)


def start(*args: str) -> subprocess.Popen:
    """The installed command leading its own process group, as a batch job's step does."""
    return subprocess.Popen(
        [SUNCET, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
        start_new_session=True,
    )


def wait_for(path_glob: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if list(path_glob.parent.glob(path_glob.name)) if path_glob.parent.exists() else []:
            return
        time.sleep(0.02)
    raise AssertionError(f"the process ended before {path_glob.name} appeared: {process.communicate()}")


def test_sigterm_to_the_process_group_with_loader_workers_checkpoints_and_exits_75(tmp_path):
    run = tmp_path / "run"
    process = start(
        "train",
        *SMALL,
        "--epochs",
        "1",
        "--data-pipeline",
        "workers",
        "--num-workers",
        "2",
        "--checkpoint-every",
        "3steps",
        "--out",
        str(run),
    )
    wait_for(run / "checkpoints" / "step-*.pt", process)
    os.killpg(process.pid, signal.SIGTERM)  # the trainer and every loader worker, as SLURM does
    _, err = process.communicate(timeout=300)
    assert process.returncode == 75, err
    assert "checkpoint written" in err and "worker" not in err.lower() and "Traceback" not in err
    status = (run / "status.json").read_text()
    assert '"interrupted"' in status
    resumed = subprocess.run([SUNCET, "train", "--resume", str(run)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has installed a handler for ``sig`` (Linux's /proc)."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
    except OSError:
        return False
    return bool(int(fields["SigCgt"], 16) >> (sig - 1) & 1)


@pytest.mark.parametrize(
    "arguments",
    [
        ["train", *SMALL, "--epochs", "1"],
        ["runs", "."],
        ["plugins"],
        ["export", "nowhere"],
        ["compare", "a", "b"],
    ],
    ids=lambda a: a[0],
)
@pytest.mark.parametrize(
    "sig,code,line",
    [
        (signal.SIGTERM, 75, "SIGTERM: suncet {command} interrupted"),
        (signal.SIGUSR1, 75, "SIGUSR1: suncet {command} interrupted"),
        (signal.SIGINT, 130, "error: interrupted"),
    ],
    ids=["SIGTERM", "SIGUSR1", "SIGINT"],
)
def test_a_signal_while_a_command_starts_is_answered_with_its_line_and_code(tmp_path, arguments, sig, code, line):
    process = subprocess.Popen(
        [SUNCET, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    # The first instant the command's own code runs: its handlers are installed, and click,
    # rich, torch and the plugins are still to be imported.
    deadline = time.time() + 60
    while not catches(process.pid, signal.SIGTERM) and time.time() < deadline and process.poll() is None:
        time.sleep(0.001)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert err.strip().splitlines() == [line.format(command=arguments[0])], err
    assert list(tmp_path.iterdir()) == []
