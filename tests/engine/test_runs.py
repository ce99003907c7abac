"""`suncet runs`: real run directories left finished, stopped by a signal, killed, and failed."""

from __future__ import annotations

import csv
import json
import signal
import textwrap

import pytest
from conftest import SMALL_TRAINING, start, wait_for_checkpoint

NAN_AT_STEP_3 = '''
    from suncet.plugins.methods.simclr import SimCLR

    class NanAtThree(SimCLR):
        """SimCLR whose loss is NaN at step 3 (fault injection)."""

        def forward(self, batch):
            terms = super().forward(batch)
            if batch.step == 3:
                terms["loss"] = terms["loss"] * float("nan")
            return terms
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One folder with a finished, a SIGTERM-stopped, a SIGKILL-ed and a failed run."""
    root = tmp_path_factory.mktemp("runs")
    site = root / "site"
    info = site / "nan_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nan-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[suncet.methods]\nnan_at_three = nan_plugin:NanAtThree\n")
    (site / "nan_plugin.py").write_text(textwrap.dedent(NAN_AT_STEP_3))
    folder = root / "runs"
    finished = start("train", "--epochs", "1", *SMALL_TRAINING, "--out", str(folder / "finished"))
    failed = start(
        "train",
        "--method",
        "nan_at_three",
        "--epochs",
        "1",
        *SMALL_TRAINING,
        "--out",
        str(folder / "sweep" / "failed"),
        env={"PYTHONPATH": str(site)},
    )
    stopped, killed = (
        start("train", "--epochs", "3", *SMALL_TRAINING, "--checkpoint-every", "4steps", "--out", str(folder / name))
        for name in ("stopped", "killed")
    )
    for process, sig in ((stopped, signal.SIGTERM), (killed, signal.SIGKILL)):
        wait_for_checkpoint(folder / ("stopped" if process is stopped else "killed"), process)
        process.send_signal(sig)
    codes = [p.wait(timeout=600) for p in (finished, failed, stopped, killed)]
    assert codes == [0, 3, 75, -signal.SIGKILL], [p.stderr.read() for p in (finished, failed, stopped)]
    return folder


def by_name(summaries):
    return {s["run"].rsplit("/", 1)[-1]: s for s in summaries}


def test_runs_json_gives_each_state_and_reason(runs, cli):
    result = cli("runs", str(runs), "--json")
    assert result.returncode == 0, result.stderr
    summaries = by_name(json.loads(result.stdout))
    assert sorted(summaries) == ["failed", "finished", "killed", "stopped"]
    finished = summaries["finished"]
    with open(runs / "finished" / "metrics.csv", newline="") as handle:
        row = list(csv.DictReader(handle))[-1]
    assert (finished["state"], finished["reason"], finished["epochs_done"], finished["epochs"]) == (
        "finished",
        None,
        1,
        1,
    )
    assert (finished["method"], finished["dataset"], finished["labels"]) == ("simclr", "digits", "10%")
    assert finished["knn_top1_best"] == finished["knn_top1_last"] == float(row["knn_top1"])
    assert finished["images_per_second"] == float(row["images_per_second"]) and finished["linear_top1_best"] is None
    stopped = summaries["stopped"]
    assert stopped["state"] == "interrupted, resumable" and stopped["reason"].startswith("stopped (SIGTERM) at epoch")
    assert f"--resume {runs / 'stopped'}" in stopped["reason"]
    killed = summaries["killed"]
    assert killed["state"] == "interrupted, resumable" and "ended without a word" in killed["reason"]
    failed = summaries["failed"]
    assert failed["state"] == "failed" and failed["reason"].startswith("non-finite loss at epoch 1, step 3: loss = nan")
    assert failed["epochs_done"] == 0


def test_runs_table_shows_every_run(runs, cli):
    result = cli("runs", str(runs))
    assert result.returncode == 0, result.stderr
    for text in ("finished", "interrupted, resumable", "failed: non-finite loss", "sweep/failed", "1/1", "0/3"):
        assert text in result.stdout, text


def test_runs_of_a_missing_folder_is_one_line(cli, tmp_path):
    result = cli("runs", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such folder of runs"
