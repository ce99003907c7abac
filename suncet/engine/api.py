"""The Python API: what ``suncet train`` does, as one call.

import suncet
result = suncet.train(method="simclr", labels="10%", epochs=20, out="runs/quick")
print(result.evaluation["top1"])
backbone = suncet.load_backbone(result.run_dir)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from suncet import distributed
from suncet.config import TrainConfig
from suncet.engine import rundir
from suncet.engine.evaluate import final_evaluation
from suncet.engine.loop import train_run
from suncet.engine.rundir import Start, last_metrics, start_or_resume
from suncet.engine.stopping import stop_at_once
from suncet.errors import SuncetError, TrainingStopped
from suncet.presets import build_config, given_keys
from suncet.terminal import Terminal, plain


@dataclass
class RunResult:
    run_dir: Path
    config: TrainConfig
    metrics: dict  # the last metrics row
    evaluation: dict | None  # the final evaluation (None with final_eval 'none', and on ranks > 0)
    main_process: bool = True  # rank 0, which wrote the files (under torchrun every rank returns)


def run_start(start: Start, console: Console | None = None, given: frozenset[str] = frozenset()) -> RunResult:
    """Train from ``start`` (see ``start_or_resume``; ``given``: the settings the user gave) and
    evaluate as the config asks (rank 0); the run directory's lock is released at the end,
    whatever happens."""
    try:
        return _train_and_evaluate(start, console, given)
    finally:
        if start.lock is not None:
            start.lock.release()


def _train_and_evaluate(start: Start, console: Console | None, given: frozenset[str]) -> RunResult:
    try:
        metrics = train_run(start.config, start.run_dir, state=start.checkpoint, console=console, given=given)
        metrics = metrics or last_metrics(start.run_dir)  # a finished run resumed trains nothing
        main_process = distributed.is_main_process()
        with stop_at_once(f"the final evaluation (training finished; it runs again with --resume {start.run_dir})"):
            evaluation = final_evaluation(start.run_dir, start.config) if main_process else None
    except TrainingStopped as exc:
        _record_end(start.run_dir, "interrupted", str(exc))
        distributed.shutdown()  # every rank agreed to stop: no collective is pending
        raise
    except KeyboardInterrupt:
        _record_end(start.run_dir, "interrupted", "interrupted at once (a second Ctrl-C), after the last checkpoint")
        raise
    except Exception as exc:
        _record_end(
            start.run_dir, "failed", str(exc) if isinstance(exc, SuncetError) else f"{type(exc).__name__}: {exc}"
        )
        raise
    _record_end(start.run_dir, "finished")
    distributed.shutdown()
    return RunResult(start.run_dir, start.config, metrics, evaluation, main_process)


def _record_end(run_dir: Path, state: str, reason: str | None = None) -> None:
    """The run's status.json, where this process started training it (errors before that,
    such as a refused resume, leave the run's last status as it was)."""
    if distributed.is_main_process() and rundir.owns_status(run_dir):
        rundir.write_status(run_dir, state, reason)


def train(
    config: TrainConfig | dict[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    console: Console | None = None,
    **settings: Any,
) -> RunResult:
    """Pre-train and evaluate, as ``suncet train`` does.

    ``config`` is a ``TrainConfig``, or a dict of settings (preset and dataset defaults apply as on
    the command line), or omitted with the settings as keyword arguments. ``resume`` is a run
    directory to continue (no settings then) or ``"auto"`` (continue or start the run in ``out``).
    """
    given: frozenset[str] = frozenset()
    if isinstance(config, TrainConfig):
        if settings:
            raise TypeError("give either a TrainConfig or settings, not both")
        resolved = config
    elif config is not None or settings:
        overrides = {**(config or {}), **settings}
        resolved, given = build_config(overrides=overrides, given_by="argument"), given_keys(overrides=overrides)
    else:
        resolved = None if resume not in (None, "auto") else build_config()
    printer = console or Terminal()
    start = start_or_resume(resolved, out, resume, overwrite, report=lambda line: printer.print(plain(line)))
    return run_start(start, console, given)
