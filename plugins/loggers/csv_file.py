"""metrics.csv: one row per epoch in the run directory."""

from __future__ import annotations

from suncet.engine import rundir
from suncet.loggers import Logger
from suncet.registry import register_logger


@register_logger("csv")
class CsvLogger(Logger):
    """RUN/metrics.csv, one row per epoch (always on)."""

    def __init__(self, *, run_dir, config, epoch, step):
        super().__init__(run_dir=run_dir, config=config, epoch=epoch, step=step)
        # Rows written after the checkpoint (or by a replaced run) describe epochs that run again.
        rundir.truncate_metrics(self.run_dir, epoch)

    def log_epoch(self, epoch: int, row: dict) -> None:
        rundir.append_metrics_row(self.run_dir, row)
