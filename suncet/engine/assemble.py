"""A run assembled from its config: data, labeled subset, method with its labeled term,
optimizer and pipeline. The checks that need more than the settings (plugins, label specs,
backends, the data, the world size) run here, before any file is written."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import Tensor, nn

from suncet import distributed
from suncet.config import TrainConfig, validate
from suncet.data import AugmentRecipe, ConcatImages, CropSpec, ImageDataset, ImageSource, InMemoryImages
from suncet.data.image_batch import ImageBatch
from suncet.data.labels import is_label_file, parse_label_spec, read_subset_file, select_labeled
from suncet.data.pipeline import DevicePipeline, Pipeline
from suncet.data.recipe import override_recipe
from suncet.data.samplers import ClassStratifiedSampler, UnlabeledSampler
from suncet.data.sources import on_device
from suncet.data.worker_pipeline import WorkerPipeline
from suncet.engine.fit import fit_to_data
from suncet.engine.run import Run
from suncet.engine.state import check_compatible, check_state_matches, parse_every
from suncet.errors import ConfigError, shown
from suncet.kernels import BACKENDS, resolve_backend
from suncet.losses import ContrastiveLosses
from suncet.methods import Method, MethodConfig, labeled_term_from_settings, parse_options
from suncet.optim import parameter_groups
from suncet.registry import BACKBONES, DATASETS, LABEL_LOSSES, LOGGERS, METHODS, OPTIMIZERS, PluginInfo, plugin_code

# Stands in for the dataset's own recipe when augmentation overrides are checked before any
# data is read (the launcher of a multi-process run checks them once, before workers start).
_ANY_RECIPE = AugmentRecipe(CropSpec(224, (0.08, 1.0)), CropSpec(96, (0.05, 0.14)), 1.0, 0.5, (0.5,) * 3, (0.25,) * 3)


def check_settings(config: TrainConfig) -> None:
    """What the engine checks of a config, before anything is built, read or written: every
    setting of its type and in range (config.validate), the label spec and checkpoint interval
    parse, the backend exists, every plugin named exists and takes its options (names, types,
    finite numbers, declared ranges)."""
    validate(config)
    if not is_label_file(config.labels):
        parse_label_spec(config.labels)
    parse_every(config.checkpoint_every)
    if config.backend not in ("auto", *BACKENDS):
        raise ConfigError(
            f"unknown contrastive backend {shown(config.backend)}; choose one of auto, {', '.join(BACKENDS)}"
        )
    LABEL_LOSSES.get(config.label_loss)
    method = METHODS.get(config.method).obj
    if hasattr(method, "Options"):
        parse_options(method.Options, config.method_options, method.__name__)
    BACKBONES.check_options(config.backbone, config.backbone_options, ("in_channels", "image_size"))
    OPTIMIZERS.check_options(config.optimizer, config.optimizer_options)
    DATASETS.check_options(config.dataset, config.dataset_options, ("root", "download"))
    override_recipe(_ANY_RECIPE, config.augment)


class PluginImages:
    """A dataset plugin's own image source (not one of suncet.data's), whose ``load`` runs as
    plugin code: an exception from it names the dataset."""

    def __init__(self, source: ImageSource, plugin: PluginInfo):
        self.source, self.plugin, self.labels = source, plugin, source.labels

    def __len__(self) -> int:
        return len(self.source)

    def load(self, indices: Tensor) -> Tensor | ImageBatch:
        with plugin_code(self.plugin, "load"):
            return self.source.load(indices)


def load_dataset(config: TrainConfig) -> ImageDataset:
    dataset = DATASETS.create(
        config.dataset, root=config.data, download=config.download, options=config.dataset_options
    )
    plugin = DATASETS.get(config.dataset)
    for split in ("train", "test", "extra_unlabeled"):
        source = getattr(dataset, split)
        if source is not None and not isinstance(source, InMemoryImages):
            setattr(dataset, split, PluginImages(source, plugin))
    if config.augment:
        dataset.recipe = override_recipe(dataset.recipe, config.augment)
    return dataset


def choose_labeled(config: TrainConfig, dataset: ImageDataset) -> Tensor:
    """The labeled subset's training indices; a spec that asks for labels but rounds to none of
    this dataset's images is an error (0% is how to ask for none)."""
    if is_label_file(config.labels):
        return read_subset_file(Path(config.labels), dataset)
    spec = parse_label_spec(config.labels)
    labeled = select_labeled(dataset.train.labels, spec, dataset.num_classes, config.label_seed)
    if len(labeled) == 0 and (spec.fraction or spec.per_class):
        smallest = 100 / len(dataset.train)
        raise ConfigError(
            f"--labels {config.labels} selects none of the {len(dataset.train)} training images of {dataset.name}; "
            f"use 0% for no labels, or at least {smallest:.2g}%"
        )
    return labeled


def check_data(
    config: TrainConfig, world_size: int, given: frozenset[str] = frozenset(), dataset: ImageDataset | None = None
) -> tuple[TrainConfig, list[str]]:
    """What can only be checked with the data, for a launcher before its workers start: the
    dataset loads, the labeled subset is drawn, and the settings fit the data on ``world_size``
    processes (engine/fit.py; ``given``: the settings the user gave). Returns the settings as the
    run will use them, and the changes."""
    dataset = dataset or load_dataset(config)
    labeled = choose_labeled(config, dataset)
    unlabeled = len(dataset.train) + (len(dataset.extra_unlabeled) if dataset.extra_unlabeled is not None else 0)
    return fit_to_data(config, dataset, labeled, unlabeled, world_size, given)


def backbone_args_of(config: TrainConfig, dataset: ImageDataset) -> dict:
    return {"in_channels": dataset.channels, "image_size": dataset.recipe.global_crop.size}


def build_backbone(config: TrainConfig, backbone_args: dict) -> nn.Module:
    return BACKBONES.create(config.backbone, options=config.backbone_options, **backbone_args)


def build_method(config: TrainConfig, dataset: ImageDataset, steps_per_epoch: int) -> Method:
    """The method ``config`` names with its backbone, the run's contrastive losses and the labeled
    term the settings name (SuNCEt, cross-entropy, another label loss, or none)."""
    backbone = build_backbone(config, backbone_args_of(config, dataset))
    losses = ContrastiveLosses.build(config.tau, config.backend, "detached" if config.detach_remote_keys else "grad")
    info = METHODS.get(config.method)
    if not (inspect.isclass(info.obj) and issubclass(info.obj, Method)):
        raise ConfigError(f"method plugin '{config.method}' is not a subclass of suncet.methods.Method")
    term = labeled_term_from_settings(config, info.obj, backbone.feature_dim, dataset.num_classes, losses)
    with plugin_code(info):
        method = info.obj(backbone, MethodConfig(config, dataset.num_classes, steps_per_epoch, losses, term))
    return method


def may_skip_parameters(method: Method) -> bool:
    """Whether some steps leave parameters of ``method`` without gradients: its own declaration,
    or a labeled term with parameters that is switched off before the run ends."""
    term = method.labeled_term
    return method.may_skip_parameters or (term is not None and term.may_skip_parameters)


def _labeled_sampler(
    config: TrainConfig, dataset: ImageDataset, labeled: Tensor, method: Method
) -> ClassStratifiedSampler | None:
    if len(labeled) == 0 and method.needs_labels:
        raise ConfigError(
            f"method '{config.method}' trains on labeled images, but --labels {config.labels} selects none"
        )
    if not method.wants_labeled(0) or len(labeled) == 0:
        return None
    return ClassStratifiedSampler(
        dataset.train.labels[labeled],
        config.classes_per_step,
        config.images_per_class,
        config.seed,
        distributed.rank(),
        distributed.world_size(),
    )


def assemble(
    config: TrainConfig,
    run_dir: Path,
    labeled: Tensor | None = None,
    checkpoint: dict | None = None,
    checkpoint_path: Path | None = None,
    resuming: bool = False,
    given: frozenset[str] = frozenset(),
) -> Run:
    """The run of ``config``, to be loaded from ``checkpoint`` (read from ``checkpoint_path``)
    when given: resuming, the checkpoint must come from these very settings; in any case its
    tensors are checked against a meta-device build first, so no size in the settings can
    allocate more than the checkpoint holds. ``given`` names the settings the user gave: the
    data fits the others (engine/fit.py)."""
    check_settings(config)
    device = distributed.init_from_environment(config.device)
    if config.sync_bn and distributed.world_size() > 1 and device.type != "cuda":
        raise ConfigError(
            "--sync-bn with several processes needs CUDA devices (SyncBatchNorm has no CPU implementation)"
        )
    torch.manual_seed(config.seed)
    dataset = load_dataset(config)
    if labeled is None:
        labeled = choose_labeled(config, dataset)
    unlabeled = (
        dataset.train if dataset.extra_unlabeled is None else ConcatImages(dataset.train, dataset.extra_unlabeled)
    )
    config, adapted = fit_to_data(config, dataset, labeled, len(unlabeled), distributed.world_size(), given)
    unlabeled_sampler = UnlabeledSampler(
        len(unlabeled), config.batch_size, config.seed, distributed.rank(), distributed.world_size()
    )
    if checkpoint is not None:
        if resuming:
            check_compatible(config, checkpoint, run_dir)  # as fitted to the data, as the checkpoint's was
        with torch.device("meta"):
            shell = build_method(config, dataset, unlabeled_sampler.steps_per_epoch)
        check_state_matches(shell.state_dict(), checkpoint["model"], checkpoint_path)
    method = build_method(config, dataset, unlabeled_sampler.steps_per_epoch).to(device)
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    resolve_backend(config.backend, device)
    for name in config.loggers:
        LOGGERS.get(name)  # an unknown name fails here, on every rank, before any file is written
    labeled_sampler = _labeled_sampler(config, dataset, labeled, method)
    optimizer = OPTIMIZERS.create(
        config.optimizer,
        parameter_groups(method, config.weight_decay),
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        options=config.optimizer_options,
    )
    train_images = on_device(dataset.train, device) if config.data_pipeline == "device" else dataset.train
    if dataset.extra_unlabeled is None:
        unlabeled = train_images
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
        backbone_args=backbone_args_of(config, dataset),
        adapted=adapted,
    )


def make_pipeline(run: Run) -> Pipeline:
    """The run's data pipeline, seeded per rank."""
    method, recipe, device, config = run.method, run.dataset.recipe, run.device, run.config
    seed = config.seed + 1_000_003 * distributed.rank()
    if config.data_pipeline == "workers":
        return WorkerPipeline(
            run.unlabeled,
            run.train_images,
            recipe,
            method.global_views,
            method.local_views,
            device,
            seed,
            num_workers=config.num_workers,
        )
    return DevicePipeline(
        run.unlabeled, run.train_images, recipe, method.global_views, method.local_views, device, seed
    )


def wrap_model(run: Run) -> nn.Module:
    """The module a step calls: the method, under DDP when several processes train, and under
    torch.compile when asked."""
    model: nn.Module = run.method
    if distributed.world_size() > 1:
        if run.config.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Buffers are not broadcast at each step: they stay per rank (SwAV's queue holds this
        # rank's embeddings); BatchNorm statistics are then rank 0's in checkpoints, or shared by
        # all with --sync-bn. Wrapping copies rank 0's buffers to every rank, so state that differs
        # between ranks (Method.rank_state) is restored after it (loop.train).
        ddp = torch.nn.parallel.DistributedDataParallel
        per_rank_buffers = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else {"broadcast_buffers": False}
        )  # before torch 2.13
        model = ddp(
            model,
            device_ids=[run.device] if run.device.type == "cuda" else None,
            find_unused_parameters=may_skip_parameters(run.method),
            **per_rank_buffers,
        )
    if run.config.compile != "none":
        model = torch.compile(model, mode=run.config.compile)
    return model
