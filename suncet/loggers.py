"""The interface of logger plugins: where a run's numbers go besides the console.

The engine builds every logger of a run (``csv``, which writes metrics.csv, and those named by
``--logger``) on rank 0 only, as ``factory(run_dir=..., config=..., epoch=..., step=...)``, where
``epoch`` and ``step`` are where training starts: 0 for a fresh run, the checkpoint's position on
resume (a logger then drops or hides what it recorded after that point).
"""

from __future__ import annotations

from pathlib import Path

from suncet.config import TrainConfig
from suncet.registry import LOGGERS, PluginInfo, plugin_code


class Logger:
    """A run's logger. Every hook is optional; values are Python numbers, never tensors."""

    def __init__(self, *, run_dir: Path, config: TrainConfig, epoch: int, step: int):
        self.run_dir, self.config = Path(run_dir), config

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        """At each host sync (every ``--sync-every`` steps): that step's loss terms, ``lr`` and
        ``images_per_second`` (of the epoch so far)."""

    def log_epoch(self, epoch: int, row: dict[str, float]) -> None:
        """After each epoch (1-based): its metrics.csv row (``step`` is the global step)."""

    def close(self) -> None:
        """The run ended, finished or not: flush and release files."""


class Loggers:
    """The run's loggers as one: metrics.csv first, then those the config names, each once; a
    logger that raises stops the run with one line naming it."""

    def __init__(self, config: TrainConfig, run_dir: Path, epoch: int, step: int, build: bool = True):
        names = list(dict.fromkeys(["csv", *config.loggers])) if build else []
        self.loggers: list[tuple[PluginInfo, Logger]] = []
        for name in names:
            info = LOGGERS.get(name)
            with plugin_code(info):
                self.loggers.append((info, info.obj(run_dir=run_dir, config=config, epoch=epoch, step=step)))

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        for info, logger in self.loggers:
            with plugin_code(info, "log_step"):
                logger.log_step(step, scalars)

    def log_epoch(self, epoch: int, row: dict[str, float]) -> None:
        for info, logger in self.loggers:
            with plugin_code(info, "log_epoch"):
                logger.log_epoch(epoch, row)

    def close(self) -> None:
        for info, logger in self.loggers:
            with plugin_code(info, "close"):
                logger.close()
