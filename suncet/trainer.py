"""The training loop: assemble a run from plugins, pre-train, monitor, checkpoint, evaluate.

Read top to bottom: ``train`` builds everything from the config, then loops over epochs
(one pass over the unlabeled images each) and steps (one forward pass over
[unlabeled views; labeled view]); at each epoch's end it logs metrics and writes a checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from suncet.augment import override_recipe
from suncet.checkpoint import CheckpointError, load_checkpoint, newest_loadable, save_rotating
from suncet.config import TrainConfig, config_from_saved, is_label_file, load_yaml, parse_every, to_yaml
from suncet.data import ImageDataset, ImageSource, InMemoryImages
from suncet.errors import ConfigError, SuncetError
from suncet.evaluation import extract_features, finetune, knn_classify, linear_probe, raw_pixel_baseline
from suncet.kernels import resolve_backend
from suncet.labels import parse_label_spec, read_subset_file, select_labeled, write_labels
from suncet.methods import Method, MethodConfig
from suncet.optim import parameter_groups, warmup_cosine
from suncet.pipeline import DevicePipeline, StepPlan, images_in
from suncet.worker_pipeline import WorkerPipeline
from suncet.registry import BACKBONES, DATASETS, METHODS, OPTIMIZERS
from suncet.samplers import ClassStratifiedSampler, UnlabeledSampler
from suncet.stopping import EXIT_PREEMPTED, StopRequests
from suncet.transfer import to_device
from suncet import distributed

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
LABELS_FILE = "labels.txt"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = Path(CHECKPOINTS) / "last.pt"


class NonFiniteLossError(SuncetError):
    exit_code = 3


class TrainingStopped(SuncetError):
    """Training stopped on request after writing a checkpoint; ``exit_code`` tells why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def default_run_dir(config: TrainConfig) -> Path:
    labels = config.labels.replace("%", "pct").replace("/", "per")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.method}-{config.dataset}-{labels}-seed{config.seed}-{stamp}"


@dataclass
class Run:
    """A training run assembled from its config: data, labeled subset, model and optimizer."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    dataset: ImageDataset
    labeled: Tensor  # indices into dataset.train
    method: Method
    optimizer: torch.optim.Optimizer
    unlabeled: ImageSource
    train_images: ImageSource  # the training split where the pipeline reads it (labeled images)
    unlabeled_sampler: UnlabeledSampler
    labeled_sampler: ClassStratifiedSampler | None


class _Concat:
    """The unlabeled stream: the training images followed by any extra unlabeled images."""

    def __init__(self, first: ImageSource, second: ImageSource):
        self.first, self.second = first, second
        self.labels = torch.cat([first.labels, second.labels])

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def load(self, indices: Tensor) -> Tensor:
        n = len(self.first)
        in_first = indices < n
        images_first = self.first.load(indices[in_first])
        out = images_first.new_empty((len(indices), *images_first.shape[1:]))
        # Positions found on the host: a boolean mask on a GPU would synchronise to count them.
        for where, images in ((in_first, images_first), (~in_first, self.second.load(indices[~in_first] - n))):
            out.index_copy_(0, to_device(where.nonzero().squeeze(1), out.device), to_device(images, out.device))
        return out


def _on_device(source: ImageSource, device: torch.device) -> ImageSource:
    # Small decoded datasets live on the training device: a step then never waits on a copy.
    return source.to(device) if isinstance(source, InMemoryImages) else source


def load_dataset(config: TrainConfig) -> ImageDataset:
    dataset = DATASETS.create(config.dataset, root=config.data, download=config.download, options=config.dataset_options)
    if config.augment:
        dataset.recipe = override_recipe(dataset.recipe, config.augment)
    return dataset


def choose_labeled(config: TrainConfig, dataset: ImageDataset) -> Tensor:
    if is_label_file(config.labels):
        return read_subset_file(Path(config.labels), dataset)
    spec = parse_label_spec(config.labels)
    return select_labeled(dataset.train.labels, spec, dataset.num_classes, config.label_seed)


def build_method(config: TrainConfig, dataset: ImageDataset, steps_per_epoch: int) -> Method:
    backbone = BACKBONES.create(
        config.backbone,
        in_channels=dataset.channels,
        image_size=dataset.recipe.global_crop.size,
        options=config.backbone_options,
    )
    method_config = MethodConfig(
        num_classes=dataset.num_classes,
        tau=config.tau,
        suncet_weight=config.suncet_weight,
        suncet_epochs=config.suncet_epochs,
        proj_hidden=config.proj_hidden,
        proj_dim=config.proj_dim,
        kernel=config.kernel,
        steps_per_epoch=steps_per_epoch,
        gather=None if distributed.world_size() == 1 else ("detached" if config.detach_remote_keys else "grad"),
        options=dict(config.method_options),
    )
    method = METHODS.get(config.method).obj(backbone, method_config)
    if not isinstance(method, Method):
        raise ConfigError(f"method plugin '{config.method}' did not build a suncet.methods.Method")
    return method


def assemble(config: TrainConfig, run_dir: Path, labeled: Tensor | None = None) -> Run:
    device = distributed.init_from_environment(config.device)
    if config.sync_bn and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
    torch.manual_seed(config.seed)
    dataset = load_dataset(config)
    if labeled is None:
        labeled = choose_labeled(config, dataset)
    unlabeled = dataset.train if dataset.extra_unlabeled is None else _Concat(dataset.train, dataset.extra_unlabeled)
    rank, world = distributed.rank(), distributed.world_size()
    unlabeled_sampler = UnlabeledSampler(len(unlabeled), config.batch_size, config.seed, rank, world)
    method = build_method(config, dataset, unlabeled_sampler.steps_per_epoch).to(device)
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    resolve_backend(config.kernel, device)
    if config.classes_per_step > dataset.num_classes:
        raise ConfigError(f"--classes-per-step {config.classes_per_step} is more than the {dataset.num_classes} classes of {dataset.name}")
    labeled_sampler = None
    if len(labeled) == 0 and not (method.global_views or method.local_views):
        raise ConfigError(f"method '{config.method}' trains on labeled images only, but --labels {config.labels} selects none")
    if method.wants_labeled(0) and len(labeled) > 0:
        # A tiny subset (0.5% of digits) may cover fewer classes than a step asks for.
        labeled_sampler = ClassStratifiedSampler(
            dataset.train.labels[labeled],
            min(config.classes_per_step, len(torch.unique(dataset.train.labels[labeled]))),
            config.images_per_class,
            config.seed,
            rank,
            world,
        )
    optimizer = OPTIMIZERS.create(
        config.optimizer,
        parameter_groups(method, config.weight_decay),
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        options=config.optimizer_options,
    )
    on_device = config.data_pipeline == "device"
    train_images = _on_device(dataset.train, device) if on_device else dataset.train
    if dataset.extra_unlabeled is None:
        unlabeled = train_images
    elif on_device:
        unlabeled = _on_device(unlabeled, device)
    return Run(
        config=config,
        run_dir=run_dir,
        device=device,
        dataset=dataset,
        labeled=labeled,
        method=method,
        optimizer=optimizer,
        unlabeled=unlabeled,
        train_images=train_images,
        unlabeled_sampler=unlabeled_sampler,
        labeled_sampler=labeled_sampler,
    )


PROTOCOLS = ("linear", "knn", "finetune")


def evaluate_run(
    run: Run, protocol: str, labeled: Tensor | None = None, finetune_epochs: int | None = None, baseline: bool = False
) -> dict:
    """Semi-supervised test accuracy with the labeled subset (all training labels when it is empty).

    'knn' and 'linear' use frozen backbone features; 'finetune' trains the whole backbone plus a
    zero-initialised linear layer on the labeled images (30 epochs at >= 10% labels, else 60, as
    the paper). With ``baseline``, small in-memory datasets also get the raw-pixel baseline.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got '{protocol}'")
    dataset, device, backbone = run.dataset, run.device, run.method.backbone
    labeled = run.labeled if labeled is None else labeled
    bank = labeled if len(labeled) else torch.arange(len(dataset.train))
    if protocol == "finetune":
        fraction = len(bank) / len(dataset.train)
        epochs = finetune_epochs or (30 if fraction >= 0.1 else 60)
        scores = finetune(backbone, dataset, bank, device, epochs=epochs, seed=run.config.seed)
    else:
        train_features = extract_features(backbone, dataset.train, dataset, device, indices=bank)
        test_features = extract_features(backbone, dataset.test, dataset, device)
        train_labels = dataset.train.labels[bank].to(device)
        if protocol == "knn":
            scores = knn_classify(
                train_features, train_labels, test_features, dataset.test.labels, dataset.num_classes, k=run.config.knn_k
            )
        else:
            scores = linear_probe(train_features, train_labels, test_features, dataset.test.labels, dataset.num_classes)
    result = {"protocol": protocol, "labeled_images": len(bank), **scores.as_dict()}
    if baseline and isinstance(dataset.train, InMemoryImages) and dataset.image_size <= 32:
        result["raw_pixels"] = raw_pixel_baseline(dataset, bank, device).as_dict()
    return result


class Meters:
    """Sums of the logged loss terms over an epoch's steps."""

    def __init__(self, state: dict | None = None):
        self.sums: dict[str, float] = dict((state or {}).get("sums", {}))
        self.steps = int((state or {}).get("steps", 0))

    def add(self, terms: dict[str, float]) -> None:
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def means(self, device: torch.device) -> dict[str, float]:
        """Means over the epoch's steps, and over ranks (the reduction runs where NCCL can)."""
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] for k in keys] + [self.steps], dtype=torch.float64, device=device)
        totals = distributed.all_reduce_sum(values).tolist()
        return {key: totals[i] / max(1.0, totals[-1]) for i, key in enumerate(keys)}

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "steps": self.steps}


def _rewrite_metrics(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` through a temporary file, so a crash leaves the old file whole."""
    fields = list(dict.fromkeys(key for r in rows for key in r)) or ["epoch"]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_metrics_row(path: Path, row: dict) -> None:
    _rewrite_metrics(path, [*_read_metrics(path), {k: ("" if v is None else v) for k, v in row.items()}])


def _truncate_metrics(path: Path, completed_epochs: int) -> None:
    """Drop rows of epochs the checkpoint does not cover (written after it, then lost)."""
    if path.exists():
        _rewrite_metrics(path, [r for r in _read_metrics(path) if int(r["epoch"]) <= completed_epochs])


def make_pipeline(run: Run, seed: int) -> DevicePipeline | WorkerPipeline:
    method, recipe, device = run.method, run.dataset.recipe, run.device
    if run.config.data_pipeline == "workers":
        return WorkerPipeline(run.unlabeled, run.train_images, recipe, method.global_views, method.local_views,
                              device, seed, num_workers=run.config.num_workers)
    return DevicePipeline(run.unlabeled, run.train_images, recipe, method.global_views, method.local_views, device, seed)


def _checkpoint_state(run: Run, pipeline: DevicePipeline | WorkerPipeline, progress: dict, meters: Meters, sampler_state: dict | None) -> dict:
    """Everything needed to continue exactly; every rank's own streams are gathered (call on all ranks)."""
    rank_states = distributed.all_gather_objects(
        {"pipeline": pipeline.state_dict(), "labeled_sampler": sampler_state, "meters": meters.state_dict(),
         "method": run.method.rank_state()}
    )
    state = {
        "model": run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "config": dataclasses.asdict(run.config),
        "labeled": run.labeled.clone(),
        "progress": dict(progress),
        "rng": {"torch": torch.get_rng_state()},
        # Per rank: the augmentation generator, the labeled sampler's position at the start of the
        # checkpoint's epoch (the epoch's plan is drawn again from there on resume), and the
        # loss sums of the epoch so far.
        "ranks": rank_states,
    }
    if run.device.type == "cuda":
        state["rng"]["cuda"] = torch.cuda.get_rng_state(run.device)
    return state


def _restore(run: Run, state: dict, pipeline: DevicePipeline | WorkerPipeline) -> tuple[dict, Meters]:
    run.method.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and run.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], run.device)
    if len(state["ranks"]) != distributed.world_size():
        raise CheckpointError(
            f"the checkpoint was written by {len(state['ranks'])} process(es); resume it with as many (now {distributed.world_size()})"
        )
    mine = state["ranks"][distributed.rank()]
    run.method.load_rank_state(mine["method"])
    pipeline.load_state_dict(mine["pipeline"])
    if run.labeled_sampler is not None and mine["labeled_sampler"] is not None:
        run.labeled_sampler.load_state_dict(mine["labeled_sampler"])
    return dict(state["progress"]), Meters(mine["meters"])


def plan_epoch(run: Run, epoch: int) -> list[StepPlan]:
    """Which unlabeled and labeled images every step of ``epoch`` uses."""
    method = run.method
    unlabeled = run.unlabeled_sampler.epoch_batches(epoch) if (method.global_views or method.local_views) else None
    with_labels = run.labeled_sampler is not None and method.wants_labeled(epoch)
    plans = []
    for step in range(run.unlabeled_sampler.steps_per_epoch):
        labeled = labels = None
        if with_labels:
            positions, labels = run.labeled_sampler.next_batch()
            labeled = run.labeled[positions]
        plans.append(StepPlan(None if unlabeled is None else unlabeled[step], labeled, labels))
    return plans


def prepare_run_dir(config: TrainConfig, run_dir: Path | None, overwrite: bool) -> Path:
    run_dir = Path(run_dir or config.run_dir or default_run_dir(config))
    if (run_dir / CONFIG_FILE).exists() and not overwrite:
        raise ConfigError(
            f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
            "(or --resume auto) or replace it with --overwrite"
        )
    return run_dir


def load_run_config(run_dir: Path) -> TrainConfig:
    """The configuration a run was started with, exactly as saved (no preset applied again)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return config_from_saved(load_yaml(path), path)


def find_checkpoint(run_dir: Path, fallback: bool, report=None) -> dict | None:
    """The checkpoint to resume ``run_dir`` from: ``last.pt`` (an error if it cannot be read);
    with ``fallback``, or when there is no ``last.pt``, the newest one that loads (broken ones
    are skipped and reported), or None when there is none (the run then starts afresh)."""
    directory = Path(run_dir) / CHECKPOINTS
    if not fallback and (directory / "last.pt").exists():
        return load_checkpoint(directory / "last.pt")
    # No last.pt yet: a crash between writing the first numbered checkpoint and linking it.
    found = newest_loadable(directory, report)
    if found is None:
        return None
    path, state = found
    if report is not None:
        report(f"resuming from {path}")
    return state


def check_compatible(config: TrainConfig, state: dict, source: Path) -> None:
    """A checkpoint must come from a run with this very configuration."""
    saved = state["config"]
    current = dataclasses.asdict(config)
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        key = differing[0]
        raise CheckpointError(
            f"checkpoint in {source} belongs to another configuration: {key} is {saved.get(key)!r} there "
            f"but {current.get(key)!r} here" + (f" (and {len(differing) - 1} more)" if len(differing) > 1 else "")
        )


class CheckpointPolicy:
    """When to write a checkpoint: every N epochs, every N steps, or every N minutes."""

    def __init__(self, every: str):
        self.count, self.unit = parse_every(every)
        self.last_save = time.monotonic()

    def after_step(self, global_step: int) -> bool:
        if self.unit == "step":
            return global_step % self.count == 0
        return self.unit == "min" and time.monotonic() - self.last_save >= 60 * self.count

    def after_epoch(self, epoch: int) -> bool:
        return self.unit == "epoch" and epoch % self.count == 0

    def saved(self) -> None:
        self.last_save = time.monotonic()


def train(
    config: TrainConfig, run_dir: Path, *, state: dict | None = None, console: Console | None = None
) -> dict:
    """Pre-train as ``config`` says, writing everything into ``run_dir``; ``state`` is a
    checkpoint to continue from. Returns the last metrics row.

    Under torchrun every rank runs this; rank 0 alone prints and writes files.
    """
    run_dir = Path(run_dir)
    if state is not None:
        check_compatible(config, state, run_dir)
    run = assemble(config, run_dir, labeled=state["labeled"] if state else None)
    cfg, method, optimizer, device = run.config, run.method, run.optimizer, run.device
    main_process, world = distributed.is_main_process(), distributed.world_size()
    console = (console or Console()) if main_process else Console(quiet=True)
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    pipeline = make_pipeline(run, cfg.seed + 1_000_003 * distributed.rank())
    model = method
    if world > 1:
        if cfg.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Buffers stay per rank (SwAV's queue holds this rank's embeddings); BatchNorm statistics
        # are then rank 0's in checkpoints, or shared by all with --sync-bn.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=method.may_skip_parameters, broadcast_buffers=False,
        )

    if main_process:
        if state is None:
            # A replaced run's numbered checkpoints would outrank this run's in the rotation.
            shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
        write_labels(run_dir / LABELS_FILE, run.labeled, cfg.labels)

    progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "images_seen": 0, "train_seconds": 0.0,
                "skipped_steps": 0}
    meters = Meters()
    if state is not None:
        progress, meters = _restore(run, state, pipeline)
        console.print(f"resuming {run_dir} at epoch {progress['epoch']}, step {progress['step_in_epoch']}")
    if main_process:
        # Rows written after the checkpoint (or by a replaced run) describe epochs that run again.
        _truncate_metrics(run_dir / METRICS_FILE, progress["epoch"])

    steps_per_epoch = run.unlabeled_sampler.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    autocast = device.type == "cuda"
    policy = CheckpointPolicy(cfg.checkpoint_every)
    console.print(
        f"[bold]{cfg.method}[/bold] on {cfg.dataset}: {len(run.unlabeled)} unlabeled, {len(run.labeled)} labeled "
        f"({cfg.labels}), {cfg.backbone}, {cfg.epochs} epochs x {steps_per_epoch} steps, "
        f"{world} x {device}, kernel {cfg.kernel} -> {run_dir}"
    )

    def checkpoint(sampler_state: dict | None) -> None:
        state = _checkpoint_state(run, pipeline, progress, meters, sampler_state)
        if main_process:
            save_rotating(run_dir / CHECKPOINTS, progress["global_step"], state, cfg.keep_checkpoints)
        policy.saved()

    def agreed(flag: bool) -> bool:
        """True on every rank when it is true on any (ranks must take the same branch)."""
        return bool(distributed.all_reduce_max(torch.tensor(float(flag), device=device)) > 0)

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"), TimeRemainingColumn()]
    row: dict = {}
    with StopRequests(announce=console.print) as stop, Progress(*columns, console=console, transient=True) as bar, \
            contextlib.closing(pipeline):
        task = bar.add_task("train", total=total_steps, completed=progress["global_step"], status="")
        model.train()
        for epoch in range(progress["epoch"], cfg.epochs):
            epoch_sampler_state = run.labeled_sampler.state_dict() if run.labeled_sampler else None
            plans = plan_epoch(run, epoch)
            first = progress["step_in_epoch"]
            epoch_images, epoch_seconds, mark = progress["images_seen"], 0.0, time.perf_counter()
            checkpoint_at_epoch_end = False

            def account_time() -> None:
                nonlocal epoch_seconds, mark
                now = time.perf_counter()
                epoch_seconds += now - mark
                progress["train_seconds"] += now - mark
                mark = now

            for plan, batch in zip(plans[first:], pipeline.batches(plans[first:], epoch, progress["global_step"])):
                lr = warmup_cosine(progress["global_step"], total_steps, warmup_steps, cfg.lr, cfg.start_lr, cfg.final_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    terms = model(batch)
                loss = terms["loss"]
                optimizer.zero_grad(set_to_none=True)
                # One host sync per step for the loss terms and three flags that every rank must
                # agree on (they decide branches around collectives): a non-finite loss, a stop
                # request, a checkpoint due (minutes elapse differently on each rank).
                names = list(terms)
                flags = torch.tensor(
                    [0.0, float(stop.requested), float(policy.after_step(progress["global_step"] + 1))], device=device
                )
                flags[0] = (~torch.isfinite(loss)).float()
                flags = distributed.all_reduce_max(flags)
                host = torch.cat([torch.stack([terms[k].detach().float() for k in names]), flags]).tolist()
                values, (nonfinite, stopping, due) = dict(zip(names, host)), host[len(names):]
                if not nonfinite:
                    loss.backward()
                    optimizer.step()
                    method.after_optimizer_step(progress["global_step"])
                    meters.add(values)
                else:
                    bad = [k for k, v in values.items() if k != "loss" and not math.isfinite(v)] or ["loss"]
                    where = f"epoch {epoch + 1}, step {progress['global_step']}: {bad[0]} = {values[bad[0]]}"
                    if progress["skipped_steps"] >= cfg.skip_nonfinite:
                        raise NonFiniteLossError(
                            f"non-finite loss at {where}; stopped with the last good checkpoint kept in "
                            f"{run_dir / CHECKPOINTS} (--skip-nonfinite N skips up to N such steps)"
                        )
                    progress["skipped_steps"] += 1
                    console.print(f"[yellow]skipped[/yellow] a non-finite step at {where} "
                                  f"({progress['skipped_steps']}/{cfg.skip_nonfinite})")
                progress["global_step"] += 1
                progress["step_in_epoch"] += 1
                progress["images_seen"] += images_in(plan) * world
                rate = (progress["images_seen"] - epoch_images) / max(epoch_seconds + time.perf_counter() - mark, 1e-9)
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs}",
                           status=f"loss {values['loss']:.3f} lr {lr:.3g} {rate:,.0f} img/s")
                if progress["step_in_epoch"] == steps_per_epoch:
                    checkpoint_at_epoch_end = bool(due)  # the epoch's end writes it, with the metrics
                elif stopping or due:
                    account_time()
                    checkpoint(epoch_sampler_state)
                    if stopping:
                        raise TrainingStopped(
                            f"stopped ({stop.reason or 'another rank was stopped'}) at epoch {epoch + 1}, "
                            f"step {progress['global_step']}; checkpoint written; continue with: suncet train --resume {run_dir}",
                            stop.exit_code or EXIT_PREEMPTED,
                        )

            account_time()
            row = {"epoch": epoch + 1, "step": progress["global_step"], **meters.means(device), "lr": lr}
            row["images_seen"] = progress["images_seen"]
            row["train_seconds"] = round(progress["train_seconds"], 3)
            row["images_per_second"] = round((progress["images_seen"] - epoch_images) / max(epoch_seconds, 1e-9), 1)
            if main_process:
                if cfg.monitor_every and ((epoch + 1) % cfg.monitor_every == 0 or epoch + 1 == cfg.epochs):
                    row["knn_top1"] = evaluate_run(run, "knn")["top1"]
                if cfg.probe_every and ((epoch + 1) % cfg.probe_every == 0 or epoch + 1 == cfg.epochs):
                    row["linear_top1"] = evaluate_run(run, "linear")["top1"]
                _write_metrics_row(run_dir / METRICS_FILE, row)
            console.print(
                f"epoch {epoch + 1}/{cfg.epochs}  "
                + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step", "train_seconds", "images_seen"))
            )
            progress.update(epoch=epoch + 1, step_in_epoch=0)
            meters = Meters()
            stopping = agreed(stop.requested)
            if policy.after_epoch(epoch + 1) or checkpoint_at_epoch_end or epoch + 1 == cfg.epochs or stopping:
                checkpoint(run.labeled_sampler.state_dict() if run.labeled_sampler else None)
            if stopping and epoch + 1 < cfg.epochs:
                raise TrainingStopped(
                    f"stopped ({stop.reason or 'another rank was stopped'}) after epoch {epoch + 1}; checkpoint written; "
                    f"continue with: suncet train --resume {run_dir}",
                    stop.exit_code or EXIT_PREEMPTED,
                )
    distributed.barrier()
    return row


def load_trained(run_dir: Path, device: str | None = None) -> Run:
    """A finished or interrupted run, rebuilt from its directory with its last checkpoint's weights."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if device is not None:
        config = dataclasses.replace(config, device=device)
    state = load_checkpoint(run_dir / LAST_CHECKPOINT)
    run = assemble(config, run_dir, labeled=state["labeled"])
    run.method.load_state_dict(state["model"])
    run.method.eval()
    return run


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
