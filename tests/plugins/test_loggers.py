"""Logger plugins: TensorBoard event files read back with TensorBoard's own reader, and a
third-party logger installed through an entry point, both against metrics.csv."""

from __future__ import annotations

import csv
import json
import textwrap

import pytest
from conftest import SMALL_TRAINING

STEPS_PER_EPOCH, EPOCHS, SYNC_EVERY = 1437 // 64, 2, 5

RECORDER = '''
    import json
    from suncet.loggers import Logger

    class Recorder(Logger):
        """Writes every call to calls.jsonl in the run directory (a test's logger)."""

        def __init__(self, *, run_dir, config, epoch, step):
            super().__init__(run_dir=run_dir, config=config, epoch=epoch, step=step)
            self.file = open(self.run_dir / "calls.jsonl", "a")

        def log_step(self, step, scalars):
            self.file.write(json.dumps({"step": step, "scalars": scalars}) + "\\n")

        def log_epoch(self, epoch, row):
            self.file.write(json.dumps({"epoch": epoch, "row": row}) + "\\n")

        def close(self):
            self.file.write(json.dumps({"closed": True}) + "\\n")
            self.file.close()
'''


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """Two epochs on digits with TensorBoard and a third-party logger, syncing every 5 steps."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("logged")
    site = root / "site"
    info = site / "recorder_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: recorder-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[suncet.loggers]\nrecorder = recorder_plugin:Recorder\n")
    (site / "recorder_plugin.py").write_text(textwrap.dedent(RECORDER))
    run = root / "run"
    result = run_cli(
        "train",
        "--epochs",
        str(EPOCHS),
        *SMALL_TRAINING,
        "--sync-every",
        str(SYNC_EVERY),
        "--logger",
        "tensorboard",
        "--logger",
        "recorder",
        "--out",
        str(run),
        env={"PYTHONPATH": str(site)},
    )
    assert result.returncode == 0, result.stderr
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return run, rows


def sync_steps() -> list[int]:
    """The global steps (counted after the step) at which the loop reads the loss terms."""
    steps = []
    for epoch in range(EPOCHS):
        for k in range(1, STEPS_PER_EPOCH + 1):
            step = epoch * STEPS_PER_EPOCH + k
            if k == STEPS_PER_EPOCH or step % SYNC_EVERY == 0:
                steps.append(step)
    return steps


def test_tensorboard_scalars_match_metrics_csv(logged_run):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run, rows = logged_run
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    columns = [k for k in rows[0] if k not in ("epoch", "step")]
    assert {"knn_top1", "loss", "ntxent", "suncet", "lr", "images_per_second"} <= set(columns)
    for column in columns:
        scalars = events.Scalars(f"epoch/{column}")
        assert [s.step for s in scalars] == [int(r["step"]) for r in rows], column
        assert [s.value for s in scalars] == pytest.approx([float(r[column]) for r in rows], rel=1e-6), column
    for name in ("loss", "ntxent", "suncet", "lr", "images_per_second"):
        assert f"step/{name}" in tags
        assert [s.step for s in events.Scalars(f"step/{name}")] == sync_steps(), name
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    loggers:\n    - tensorboard\n    - recorder" in config and "    sync_every: 5" in config


def test_a_third_party_logger_gets_every_sync_and_every_row(logged_run):
    run, rows = logged_run
    calls = [json.loads(line) for line in (run / "calls.jsonl").read_text().splitlines()]
    steps = [c for c in calls if "step" in c]
    assert [c["step"] for c in steps] == sync_steps()
    assert set(steps[0]["scalars"]) == {"loss", "ntxent", "suncet", "lr", "images_per_second"}
    epochs = [c for c in calls if "epoch" in c]
    assert [c["epoch"] for c in epochs] == [1, 2]
    assert [{k: str(v) for k, v in c["row"].items()} for c in epochs] == rows
    assert calls[-1] == {"closed": True}


def test_every_plugin_kind_is_listed_with_loggers(cli):
    result = cli("plugins")
    assert result.returncode == 0 and "tensorboard" in result.stdout and "csv" in result.stdout
