"""Faults a long run meets: kill -9, preemption signals, Ctrl-C, corrupt checkpoints, NaN losses."""

from __future__ import annotations

import csv
import signal
import textwrap

import pytest
from conftest import SMALL_TRAINING, start, wait_for_checkpoint

SMALL = (*SMALL_TRAINING, "--seed", "5")
TIMING = {"images_per_second", "train_seconds"}
EXIT_PREEMPTED, EXIT_INTERRUPTED, EXIT_NONFINITE = 75, 130, 3


def rows(run):
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def comparable(run):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(run)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    process = start("train", "--epochs", "3", *SMALL, "--out", str(run))
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return run


def test_kill_9_mid_epoch_loses_nothing_beyond_the_last_checkpoint(uninterrupted, tmp_path):
    run = tmp_path / "run"
    args = ("train", "--epochs", "3", *SMALL, "--checkpoint-every", "4steps", "--out", str(run), "--resume", "auto")
    process = start(*args)
    wait_for_checkpoint(run, process, at_least=2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = start(*args)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resuming" in out
    assert comparable(run) == comparable(uninterrupted)


@pytest.mark.parametrize(
    "sig,code", [(signal.SIGTERM, EXIT_PREEMPTED), (signal.SIGUSR1, EXIT_PREEMPTED), (signal.SIGINT, EXIT_INTERRUPTED)]
)
def test_signal_writes_a_checkpoint_and_exits_with_its_code(uninterrupted, tmp_path, sig, code):
    run = tmp_path / "run"
    process = start("train", "--epochs", "3", *SMALL, "--checkpoint-every", "4steps", "--out", str(run))
    # The first step checkpoint proves the loop is running, 62 steps before its end (a fixed
    # delay after start-up could land after the last step on a fast machine).
    wait_for_checkpoint(run, process, at_least=1)
    process.send_signal(sig)
    _, err = process.communicate(timeout=300)
    assert process.returncode == code, err
    assert "checkpoint written" in err and f"--resume {run}" in err and "Traceback" not in err
    resumed = start("train", "--resume", str(run))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert comparable(run) == comparable(uninterrupted)


def test_truncated_checkpoint_is_named_and_auto_falls_back(uninterrupted, tmp_path, cli):
    run = tmp_path / "run"
    args = (
        "train",
        "--epochs",
        "2",
        *SMALL,
        "--checkpoint-every",
        "5steps",
        "--keep-checkpoints",
        "3",
        "--out",
        str(run),
    )
    assert cli(*args).returncode == 0
    last = run / "checkpoints" / "last.pt"
    with open(last, "r+b") as handle:  # in place: the newest numbered file shares these bytes
        handle.truncate(1000)
    result = cli("train", "--resume", str(run))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "last.pt cannot be read" in result.stderr
    result = cli(*args, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert "skipping" in result.stdout and "resuming from" in result.stdout
    assert len(rows(run)) == 2


NAN_PLUGIN = '''
    import torch
    from dataclasses import dataclass
    from suncet.plugins.methods.simclr import SimCLR

    class NanAfter(SimCLR):
        """SimCLR whose SuNCEt term turns NaN at some steps (fault injection)."""

        @dataclass
        class Options:
            bad_steps: str = ""

        def forward(self, batch):
            terms = super().forward(batch)
            if str(batch.step) in self.options.bad_steps.split(","):
                terms["suncet"] = terms["suncet"] * float("nan")
                terms["loss"] = terms["ntxent"] + terms["suncet"]
            return terms
'''


@pytest.fixture
def nan_plugin(tmp_path):
    site = tmp_path / "site"
    info = site / "fault_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fault-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[suncet.methods]\nnan_after = fault_plugins:NanAfter\n")
    (site / "fault_plugins.py").write_text(textwrap.dedent(NAN_PLUGIN))
    return {"PYTHONPATH": str(site)}


def test_nan_loss_stops_with_the_step_and_term_and_keeps_the_checkpoint(cli, nan_plugin, tmp_path):
    run = tmp_path / "run"
    result = cli(
        "train",
        "--method",
        "nan_after",
        "--method-opt",
        "bad_steps=25",
        "--epochs",
        "3",
        *SMALL,
        "--out",
        str(run),
        env=nan_plugin,
    )
    assert result.returncode == EXIT_NONFINITE
    assert "non-finite loss at epoch 2, step 25: suncet = nan" in result.stderr and "Traceback" not in result.stderr
    assert [r["epoch"] for r in rows(run)] == ["1"]
    assert cli("eval", str(run), "--protocol", "knn", "--json", env=nan_plugin).returncode == 0


def test_nan_read_at_a_later_sync_still_names_its_step(cli, nan_plugin, tmp_path):
    """With --sync-every 10 the NaN of step 3 is read at step 10 and reported as step 3."""
    result = cli(
        "train",
        "--method",
        "nan_after",
        "--method-opt",
        "bad_steps=3",
        "--sync-every",
        "10",
        "--epochs",
        "1",
        *SMALL,
        "--out",
        str(tmp_path / "run"),
        env=nan_plugin,
    )
    assert result.returncode == EXIT_NONFINITE and "Traceback" not in result.stderr
    assert "non-finite loss at epoch 1, step 3: suncet = nan" in result.stderr


def test_skip_nonfinite_skips_up_to_n_steps(cli, nan_plugin, tmp_path):
    run = tmp_path / "run"
    result = cli(
        "train",
        "--method",
        "nan_after",
        "--method-opt",
        "bad_steps=3,7",
        "--skip-nonfinite",
        "2",
        "--epochs",
        "1",
        *SMALL,
        "--out",
        str(run),
        env=nan_plugin,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("skipped a non-finite step") == 2
    assert rows(run)[0]["loss"] not in ("nan", "")
    result = cli(
        "train",
        "--method",
        "nan_after",
        "--method-opt",
        "bad_steps=3,7",
        "--skip-nonfinite",
        "1",
        "--epochs",
        "1",
        *SMALL,
        "--out",
        str(tmp_path / "again"),
        env=nan_plugin,
    )
    assert result.returncode == EXIT_NONFINITE and "step 7" in result.stderr
