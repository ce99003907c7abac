"""Built-in loggers: metrics.csv (always on) and TensorBoard event files.

A logger plugin is a callable ``(*, run_dir, config, epoch, step)`` returning a
``suncet.loggers.Logger``.
"""

from suncet.plugins.loggers import csv_file, tensorboard_events  # noqa: F401  (registers the plugins)
