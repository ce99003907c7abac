"""The training loop, top to bottom: ``train`` -> ``train_one_epoch`` -> ``step``.

``train`` restores or starts a run and loops over epochs (one pass over the unlabeled images
each); ``train_one_epoch`` loops over steps (one forward pass over [unlabeled views; labeled
view]) and ends with the epoch's metrics row and checkpoint; ``step`` is one optimisation step:
learning rate, method forward (which calls the fused contrastive loss), backward, update. It
is what ``--compile`` puts under torch.compile (the method's forward and, through AOTAutograd,
its backward).

The host waits for the device only every ``sync_every`` steps (and at each epoch's end): there
the loss terms are read, a non-finite loss stops the run, and the stop and checkpoint flags are
agreed across ranks before any branch that runs collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as ProgressBar
from torch import Tensor, nn

from suncet import distributed
from suncet.data import TrainBatch
from suncet.data.pipeline import Pipeline, StepPlan, images_in
from suncet.engine import rundir
from suncet.engine.assemble import assemble, make_pipeline, wrap_model
from suncet.engine.evaluate import evaluate_run
from suncet.engine.run import Run
from suncet.engine.state import CheckpointPolicy, checkpoint_state, restore, save_rotating
from suncet.engine.stopping import EXIT_PREEMPTED, StopRequests
from suncet.errors import NonFiniteError, TrainingStopped
from suncet.loggers import Loggers
from suncet.optim import warmup_cosine
from suncet.registry import METHODS, OPTIMIZERS, PluginInfo, plugin_code
from suncet.terminal import Terminal, plain, styled


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0
    global_step: int = 0
    images_seen: int = 0  # over all ranks
    train_seconds: float = 0.0
    skipped_steps: int = 0


class Meters:
    """Sums of the loss terms over an epoch's steps, kept on the device until they are read, and
    how many steps gave each term (a term may first appear at any step; each is averaged over
    the steps that gave it).

    It also remembers the first step whose loss was not finite, so a run that syncs every k
    steps still names the step and term that went wrong.
    """

    def __init__(self, state: dict | None = None):
        state = state or {"sums": {}, "counts": {}}
        self.names: list[str] = list(state["sums"])
        # Checkpoints written before per-term counts held one count for every term.
        self.counts: dict[str, int] = {
            k: int(state["counts"][k]) if "counts" in state else int(state["steps"]) for k in self.names
        }
        self.sums: Tensor | None = (
            torch.tensor(list(state["sums"].values()), dtype=torch.float64) if self.names else None
        )
        self.first_bad: tuple[Tensor, Tensor] | None = None  # (step, term values) on the device

    def add(self, terms: dict[str, Tensor], step: int) -> None:
        new = [k for k in terms if k not in self.names]
        if new:
            self.names += new
            if self.sums is not None:
                self.sums = torch.cat([self.sums, self.sums.new_zeros(len(new))])
            if self.first_bad is not None:
                seen, previous = self.first_bad
                self.first_bad = (seen, torch.cat([previous, previous.new_zeros(len(new))]))
        some = terms["loss"].detach()
        values = torch.stack(
            [terms[k].detach().float() if k in terms else some.new_zeros((), dtype=torch.float32) for k in self.names]
        ).double()
        self.sums = values if self.sums is None else self.sums.to(values.device) + values
        for k in terms:
            self.counts[k] = self.counts.get(k, 0) + 1
        bad = ~torch.isfinite(values[self.names.index("loss")])
        if self.first_bad is None:
            self.first_bad = (torch.full_like(bad, -1, dtype=torch.long), torch.zeros_like(values))
        seen, previous = self.first_bad
        new_bad = bad & (seen < 0)
        self.first_bad = (torch.where(new_bad, step, seen), torch.where(new_bad, values, previous))

    def nonfinite(self, device: torch.device) -> Tensor:
        if self.first_bad is None:
            return torch.zeros((), dtype=torch.bool, device=device)
        return self.first_bad[0] >= 0

    def describe_first_bad(self) -> str:
        step, values = self.first_bad[0].item(), dict(zip(self.names, self.first_bad[1].tolist()))
        return f"step {step}: {first_nonfinite(values)}"

    def means(self, device: torch.device) -> dict[str, float]:
        """Each term's mean over the steps that gave it, over all ranks (every rank contributes
        the terms any rank saw; the reduction runs where NCCL can)."""
        names = sorted({k for names in distributed.all_gather_objects(self.names) for k in names})
        sums = self.sums.to(device) if self.sums is not None else torch.zeros(0, dtype=torch.float64, device=device)
        mine = {k: i for i, k in enumerate(self.names)}
        aligned = torch.stack([sums[mine[k]] if k in mine else sums.new_zeros(()) for k in names]) if names else sums
        counts = torch.tensor([float(self.counts.get(k, 0)) for k in names], dtype=torch.float64, device=device)
        totals = distributed.all_reduce_sum(torch.cat([aligned, counts])).tolist()
        return {k: totals[i] / max(1.0, totals[len(names) + i]) for i, k in enumerate(names)}

    def state_dict(self) -> dict:
        values = self.sums.tolist() if self.sums is not None else []
        return {"sums": dict(zip(self.names, values)), "counts": {k: self.counts[k] for k in self.names}}


@dataclass
class Loop:
    """What the loop's functions share: the run, the module a step calls, and the bookkeeping."""

    run: Run
    model: nn.Module
    pipeline: Pipeline
    console: Console
    stop: StopRequests
    policy: CheckpointPolicy
    progress: Progress
    meters: Meters
    bar: ProgressBar
    loggers: Loggers
    method_plugin: PluginInfo
    optimizer_plugin: PluginInfo
    task: int = 0
    lr: float = 0.0
    last_loss: float = math.nan
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    mark: float = field(default_factory=time.perf_counter)

    @property
    def steps_per_epoch(self) -> int:
        return self.run.unlabeled_sampler.steps_per_epoch

    def schedule(self, global_step: int) -> float:
        cfg, total = self.run.config, self.run.config.epochs * self.steps_per_epoch
        warmup = min(total, round(cfg.warmup_epochs * self.steps_per_epoch))
        return warmup_cosine(global_step, total, warmup, cfg.lr, cfg.start_lr, cfg.final_lr)

    def rate(self) -> float:
        """Images per second over the epoch so far."""
        return (self.progress.images_seen - self.epoch_images) / max(
            self.epoch_seconds + time.perf_counter() - self.mark, 1e-9
        )

    def lap(self) -> None:
        """Count the time since the last lap as training time."""
        now = time.perf_counter()
        self.epoch_seconds += now - self.mark
        self.progress.train_seconds += now - self.mark
        self.mark = now

    def agreed(self, flags: Tensor) -> list[bool]:
        """Each flag true on every rank when it is true on any (ranks must take the same branch)."""
        return [v > 0 for v in distributed.all_reduce_max(flags.float().to(self.run.device)).tolist()]

    def checkpoint(self, sampler_state: dict | None) -> None:
        state = checkpoint_state(
            self.run, self.pipeline, dataclasses.asdict(self.progress), self.meters.state_dict(), sampler_state
        )
        if distributed.is_main_process():
            save_rotating(
                self.run.run_dir / rundir.CHECKPOINTS,
                self.progress.global_step,
                state,
                self.run.config.keep_checkpoints,
            )
        self.policy.saved()

    def stop_run(self, where: str) -> None:
        """The one way a run stops on request: after its checkpoint, with the signal's exit code."""
        raise TrainingStopped(
            f"stopped ({self.stop.reason or 'another rank was stopped'}) {where}; checkpoint written; "
            f"continue with: suncet train --resume {self.run.run_dir}",
            self.stop.exit_code or EXIT_PREEMPTED,
        )


def plan_epoch(run: Run, epoch: int) -> list[StepPlan]:
    """Which unlabeled and labeled images every step of ``epoch`` uses."""
    method = run.method
    unlabeled = run.unlabeled_sampler.epoch_batches(epoch) if (method.global_views or method.local_views) else None
    with_labels = run.labeled_sampler is not None and method.wants_labeled(epoch)
    plans = []
    for index in range(run.unlabeled_sampler.steps_per_epoch):
        labeled = labels = None
        if with_labels:
            positions, labels = run.labeled_sampler.next_batch()
            labeled = run.labeled[positions]
        plans.append(StepPlan(None if unlabeled is None else unlabeled[index], labeled, labels))
    return plans


def step(loop: Loop, batch: TrainBatch) -> dict[str, Tensor] | None:
    """One optimisation step. Returns the loss terms (device tensors, not read), or None when
    ``--skip-nonfinite`` skipped a non-finite step (checked before the backward, every step)."""
    run, cfg = loop.run, loop.run.config
    loop.lr = loop.schedule(loop.progress.global_step)
    for group in run.optimizer.param_groups:
        group["lr"] = loop.lr
    with (
        plugin_code(loop.method_plugin, "forward"),
        torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.device.type == "cuda"),
    ):
        terms = loop.model(batch)
    if cfg.skip_nonfinite and loop.agreed(~torch.isfinite(terms["loss"]).view(1))[0]:
        skip_step(loop, terms)
        return None
    run.optimizer.zero_grad(set_to_none=True)
    with plugin_code(loop.method_plugin, "backward"):
        terms["loss"].backward()
    with plugin_code(loop.optimizer_plugin, "step"):
        run.optimizer.step()
    with plugin_code(loop.method_plugin, "after_optimizer_step"):
        run.method.after_optimizer_step(loop.progress.global_step)
    return terms


def nonfinite_error(loop: Loop, where: str) -> NonFiniteError:
    return NonFiniteError(
        f"non-finite loss at epoch {loop.progress.epoch + 1}, {where}; stopped with the last good checkpoint kept in "
        f"{loop.run.run_dir / rundir.CHECKPOINTS} (--skip-nonfinite N skips up to N such steps)"
    )


def skip_step(loop: Loop, terms: dict[str, Tensor]) -> None:
    values = {k: v.item() for k, v in terms.items()}
    where = f"step {loop.progress.global_step}: {first_nonfinite(values)}"
    if loop.progress.skipped_steps >= loop.run.config.skip_nonfinite:
        raise nonfinite_error(loop, where)
    loop.progress.skipped_steps += 1
    loop.console.print(
        styled(
            ("skipped", "yellow"),
            f" a non-finite step at epoch {loop.progress.epoch + 1}, {where} "
            f"({loop.progress.skipped_steps}/{loop.run.config.skip_nonfinite})",
        )
    )


def first_nonfinite(values: dict[str, float]) -> str:
    """The term to blame for a non-finite loss: the first non-finite term besides the total."""
    name = next((k for k, v in values.items() if k != "loss" and not math.isfinite(v)), "loss")
    return f"{name} = {values[name]}"


def sync(loop: Loop, terms: dict[str, Tensor] | None) -> tuple[bool, bool]:
    """Wait for the device: stop on a non-finite loss, read the last loss, and agree across
    ranks on (stop requested, checkpoint due by the clock)."""
    device = loop.run.device
    flags = torch.stack(
        [
            loop.meters.nonfinite(device),
            torch.tensor(loop.stop.requested, device=device),
            torch.tensor(loop.policy.minutes_due(), device=device),
        ]
    )
    nonfinite, stopping, due = loop.agreed(flags)
    if nonfinite:
        raise nonfinite_error(
            loop, loop.meters.describe_first_bad() if loop.meters.nonfinite(device).item() else "on another rank"
        )
    if terms is not None:
        values = dict(zip(terms, torch.stack([v.detach().float() for v in terms.values()]).tolist()))
        loop.last_loss = values["loss"]
        loop.loggers.log_step(loop.progress.global_step, {**values, "lr": loop.lr, "images_per_second": loop.rate()})
    return stopping, due


def train_one_epoch(loop: Loop, epoch: int) -> tuple[dict, bool]:
    """The epoch's remaining steps; returns its metrics row and whether a checkpoint is due."""
    run, progress, cfg = loop.run, loop.progress, loop.run.config
    sampler_at_start = run.labeled_sampler.state_dict() if run.labeled_sampler else None
    plans = plan_epoch(run, epoch)[progress.step_in_epoch :]
    loop.epoch_images, loop.epoch_seconds, loop.mark = progress.images_seen, 0.0, time.perf_counter()
    due_at_end = False
    for plan, batch in zip(plans, loop.pipeline.batches(plans, epoch, progress.global_step)):
        terms = step(loop, batch)
        if terms is not None:
            loop.meters.add(terms, progress.global_step)
        progress.global_step += 1
        progress.step_in_epoch += 1
        progress.images_seen += images_in(plan) * distributed.world_size()
        last = progress.step_in_epoch == loop.steps_per_epoch
        step_due = loop.policy.step_due(progress.global_step)
        if last or step_due or progress.global_step % cfg.sync_every == 0:
            stopping, due = sync(loop, terms)
            due = due or step_due
            if last:
                due_at_end = due  # the epoch's end writes it, with the metrics
            elif stopping or due:
                loop.lap()
                loop.checkpoint(sampler_at_start)
                if stopping:
                    loop.stop_run(f"at epoch {epoch + 1}, step {progress.global_step}")
        loop.bar.update(
            loop.task,
            advance=1,
            description=f"epoch {epoch + 1}/{cfg.epochs}",
            status=f"loss {loop.last_loss:.3f} lr {loop.lr:.3g} {loop.rate():,.0f} img/s",
        )
    loop.lap()
    row = {
        "epoch": epoch + 1,
        "step": progress.global_step,
        **loop.meters.means(run.device),
        "lr": loop.lr,
        "images_seen": progress.images_seen,
        "train_seconds": round(progress.train_seconds, 3),
        "images_per_second": round((progress.images_seen - loop.epoch_images) / max(loop.epoch_seconds, 1e-9), 1),
    }
    return row, due_at_end


def monitor(run: Run, row: dict, epoch: int) -> None:
    """The kNN and linear-probe monitors due after ``epoch`` (0-based), into ``row``."""
    cfg, done = run.config, epoch + 1
    if len(run.labeled) == 0:
        return
    if cfg.monitor_every and (done % cfg.monitor_every == 0 or done == cfg.epochs):
        row["knn_top1"] = evaluate_run(run, "knn")["top1"]
    if cfg.probe_every and (done % cfg.probe_every == 0 or done == cfg.epochs):
        row["linear_top1"] = evaluate_run(run, "linear")["top1"]


def finish_epoch(loop: Loop, epoch: int, row: dict, due: bool) -> None:
    """Monitors, the metrics row, the checkpoint, and a stop requested during the epoch."""
    run, cfg = loop.run, loop.run.config
    if distributed.is_main_process():
        monitor(run, row, epoch)
        loop.loggers.log_epoch(epoch + 1, row)
    loop.console.print(
        plain(
            f"epoch {epoch + 1}/{cfg.epochs}  "
            + "  ".join(
                f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step", "train_seconds", "images_seen")
            )
        )
    )
    loop.progress.epoch, loop.progress.step_in_epoch = epoch + 1, 0
    loop.meters = Meters()
    stopping = loop.agreed(torch.tensor([loop.stop.requested]))[0]
    if loop.policy.after_epoch(epoch + 1) or due or epoch + 1 == cfg.epochs or stopping:
        loop.checkpoint(run.labeled_sampler.state_dict() if run.labeled_sampler else None)
    if stopping and epoch + 1 < cfg.epochs:
        loop.stop_run(f"after epoch {epoch + 1}")


def train(run: Run, state: dict | None = None, console: Console | None = None) -> dict:
    """Pre-train ``run`` (from ``state``, a checkpoint, when given), writing into its run
    directory; returns the last metrics row. Under torchrun every rank runs this; rank 0 alone
    prints and writes files."""
    cfg, main_process = run.config, distributed.is_main_process()
    console = (console or Terminal()) if main_process else Terminal(quiet=True)
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    console.print(
        styled(
            (cfg.method, "bold"),
            f" on {cfg.dataset}"
            + (f" (preset {cfg.preset})" if cfg.preset else "")
            + f": {len(run.unlabeled)} unlabeled, {len(run.labeled)} labeled "
            f"({cfg.labels}), {cfg.backbone}, {cfg.epochs} epochs x {run.unlabeled_sampler.steps_per_epoch} steps, "
            f"{distributed.world_size()} x {run.device}, lr {cfg.lr:.4g}"
            + (f" (for a global batch of {cfg.lr_batch})" if cfg.lr_batch else "")
            + f", backend {cfg.backend}, compile {cfg.compile} -> {run.run_dir}",
        )
    )
    for note in run.adapted:
        console.print(styled(("fitted to the data:", "yellow"), f" {note}"))
    pipeline = make_pipeline(run)
    if main_process:
        aside = rundir.write_run_files(run.run_dir, cfg, run.labeled, fresh=state is None)
        if aside is not None:
            console.print(plain(f"moved what {run.run_dir} held to {aside} (nothing deleted)"))
        rundir.write_status(run.run_dir, "running")
    # Wrapped before the checkpoint's state is restored: DDP copies rank 0's buffers to every rank.
    model = wrap_model(run)
    progress, meters = Progress(), Meters()
    if state is not None:
        saved_progress, saved_meters = restore(run, state, pipeline)
        progress, meters = Progress(**saved_progress), Meters(saved_meters)
        console.print(plain(f"resuming {run.run_dir} at epoch {progress.epoch}, step {progress.step_in_epoch}"))
    loggers = Loggers(cfg, run.run_dir, progress.epoch, progress.global_step, build=main_process)
    if len(run.labeled) == 0 and (cfg.monitor_every or cfg.probe_every or cfg.final_eval != "none"):
        console.print(
            plain("no labeled images (--labels 0%): the kNN and linear monitors and the final evaluation are off")
        )
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    ]
    row: dict = {}
    with (
        StopRequests(announce=lambda line: console.print(plain(line))) as stop,
        ProgressBar(*columns, console=console, transient=True) as bar,
        contextlib.closing(pipeline),
        contextlib.closing(loggers),
    ):
        loop = Loop(
            run,
            model,
            pipeline,
            console,
            stop,
            CheckpointPolicy(cfg.checkpoint_every),
            progress,
            meters,
            bar,
            loggers,
            METHODS.get(cfg.method),
            OPTIMIZERS.get(cfg.optimizer),
        )
        loop.task = bar.add_task(
            "train", total=cfg.epochs * loop.steps_per_epoch, completed=progress.global_step, status=""
        )
        run.method.train()
        for epoch in range(progress.epoch, cfg.epochs):
            row, due = train_one_epoch(loop, epoch)
            finish_epoch(loop, epoch, row, due)
    distributed.barrier()
    return row


def train_run(
    config, run_dir, state: dict | None = None, console: Console | None = None, given: frozenset[str] = frozenset()
) -> dict:
    """Assemble the run of ``config`` in ``run_dir`` (``given``: the settings the user gave) and
    train it (from ``state`` when given)."""
    run = assemble(
        config,
        run_dir,
        labeled=state["labeled"] if state else None,
        checkpoint=state,
        checkpoint_path=run_dir / rundir.CHECKPOINTS,
        resuming=True,
        given=given,
    )
    return train(run, state, console)
