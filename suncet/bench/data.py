"""`suncet bench data`: throughput of the data pipeline, per path and resolution.

Figures (views/s: augmented views delivered per second; images/s for decoding and training):
  augment      one view per image of a uint8 batch: torchvision v2 per image in this process
               (the baseline), BatchAugment on the device (on CUDA with its Triton kernels, and
               with PyTorch operations only), and kornia.augmentation when installed
  pipeline     whole steps (2 global views per image) through ``DevicePipeline`` (load, copy,
               augment on the device), ``WorkerPipeline`` (N loader processes, pinned copies) and,
               as the baseline, the usual torchvision loader: a per-image Dataset applying the
               full v2 pipeline twice, in a DataLoader with N workers and default collation
  decode       JPEG files of an image folder decoded and fitted to 256 px (CPU; GPU with CUDA)
  train        one SimCLR step (forward, backward, optimizer) fed by each pipeline from CIFAR-format
               files, against the same step on synthetic views already on the device
Resolutions: 32 px (CIFAR recipe, from 32 px images), 96 px (STL-10, from 96), 224 px
(ImageNet, from 256). Every figure is items / seconds over repeated runs after a warm-up run,
synchronising the device before reading the clock.
"""

from __future__ import annotations

import os
import pickle
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import click
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from suncet.data import InMemoryImages
from suncet.data.augment import BatchAugment, triton_augment_usable
from suncet.data.pipeline import DevicePipeline, StepPlan
from suncet.data.recipe import AugmentRecipe
from suncet.engine.rundir import write_json
from suncet.errors import ConfigError, shown

RESOLUTIONS = {32: 32, 96: 96, 224: 256}  # output side -> stored side of the source images
PER_IMAGE_SAMPLE = 64  # images per call of the torchvision per-image baseline


@dataclass
class Figure:
    measurement: str
    path: str
    resolution: int | None
    batch: int
    rate: float
    unit: str
    workers: int | None = None
    notes: list[str] = field(default_factory=list)


def recipe_for(resolution: int) -> AugmentRecipe:
    from suncet.plugins.datasets import cifar, imagefolder, stl10

    return {32: cifar.cifar_recipe(cifar.CIFAR10.mean, cifar.CIFAR10.std), 96: stl10.RECIPE, 224: imagefolder.RECIPE}[
        resolution
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run: Callable[[], object], items: int, device: torch.device, seconds: float) -> float:
    """Items per second of ``run`` (each call handles ``items``), after one untimed call; calls
    are repeated until ``seconds`` have passed (one call may be all, for the slow CPU paths)."""
    run()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while calls < 1 or time.perf_counter() - start < seconds:
        run()
        calls += 1
        _sync(device)
    return items * calls / (time.perf_counter() - start)


def random_images(n: int, side: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g).to(device)


def augment_figures(resolution: int, batch: int, device: torch.device, seconds: float, kornia: bool) -> list[Figure]:
    from suncet.data.worker_pipeline import image_transform

    recipe = recipe_for(resolution)
    stored = RESOLUTIONS[resolution]
    host = random_images(batch, stored, torch.device("cpu"))
    transform = image_transform(recipe, recipe.global_crop)
    # A per-image rate does not depend on the batch: a sample of it keeps the baseline short
    # where a GPU batch is large and the host slow (docs/data.md, GPU figures).
    sample = host[:PER_IMAGE_SAMPLE]

    def per_image() -> None:
        for image in sample:
            transform(image)

    # The baseline is one core's worth, as a loader worker runs it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        baseline = measure(per_image, len(sample), torch.device("cpu"), seconds)
    finally:
        torch.set_num_threads(threads)
    figures = [
        Figure(
            "augment",
            "torchvision v2 per image",
            resolution,
            len(sample),
            baseline,
            "views/s",
            notes=["this process, 1 thread"],
        )
    ]
    on_device = host.to(device)
    generator = torch.Generator().manual_seed(0)  # parameters drawn on the host, as DevicePipeline does
    paths = {f"device ({device.type})": BatchAugment(recipe, recipe.global_crop)}
    if triton_augment_usable(device):  # the default there; the PyTorch operations are the comparison
        paths[f"device ({device.type}, PyTorch ops)"] = BatchAugment(recipe, recipe.global_crop, triton_kernels=False)
    for path, augment in paths.items():
        figures.append(
            Figure(
                "augment",
                path,
                resolution,
                batch,
                measure(lambda: augment(on_device, generator), batch, device, seconds),
                "views/s",
            )
        )
    if kornia:
        figures.append(kornia_figure(recipe, on_device, resolution, device, seconds))
    return figures


def kornia_figure(
    recipe: AugmentRecipe, images: torch.Tensor, resolution: int, device: torch.device, seconds: float
) -> Figure:
    """The same recipe with kornia.augmentation (evaluated, not a dependency: docs/data.md)."""
    import kornia.augmentation as K

    from suncet.data.recipe import blur_kernel_size

    s, size = recipe.color_strength, recipe.global_crop.size
    steps = [
        K.RandomResizedCrop((size, size), scale=recipe.global_crop.scale, ratio=recipe.ratio),
        K.RandomHorizontalFlip(p=recipe.flip_p),
        K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=recipe.color_p),
        K.RandomGrayscale(p=recipe.grayscale_p),
    ]
    if recipe.blur_p > 0:
        k = blur_kernel_size(size)
        steps.append(K.RandomGaussianBlur((k, k), recipe.blur_sigma, p=recipe.blur_p))
    steps.append(K.Normalize(torch.tensor(recipe.mean), torch.tensor(recipe.std)))
    pipeline = K.AugmentationSequential(*steps).to(device)
    rate = measure(lambda: pipeline(images.float() / 255), len(images), device, seconds)
    return Figure("augment", f"kornia ({device.type})", resolution, len(images), rate, "views/s")


class _TorchvisionViews(torch.utils.data.Dataset):
    """The textbook torchvision loader item: two augmented, normalised views of one image."""

    def __init__(self, images: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return self.transform(image), self.transform(image)


def _drain_loader(loader: torch.utils.data.DataLoader, device: torch.device) -> None:
    for first, second in loader:
        first.to(device, non_blocking=True)
        second.to(device, non_blocking=True)


def _plans(n_images: int, batch: int, steps: int, seed: int) -> list[StepPlan]:
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
    return [StepPlan(order[s * batch : (s + 1) * batch], None, None) for s in range(steps)]


def pipeline_figures(
    resolution: int, batch: int, steps: int, device: torch.device, workers: list[int], seconds: float
) -> list[Figure]:
    from suncet.data.worker_pipeline import WorkerPipeline, image_transform

    recipe = recipe_for(resolution)
    n_images = batch * steps
    host = InMemoryImages(
        random_images(n_images, RESOLUTIONS[resolution], torch.device("cpu")), torch.zeros(n_images, dtype=torch.long)
    )
    views = 2 * n_images
    figures = []
    on_device = host.to(device)
    device_pipeline = DevicePipeline(on_device, on_device, recipe, 2, 0, device, seed=0)
    epoch = iter(range(1_000_000))

    def drain(pipeline) -> None:
        e = next(epoch)
        for _ in pipeline.batches(_plans(n_images, batch, steps, e), e, e * steps):
            pass

    figures.append(
        Figure(
            "pipeline",
            f"device ({device.type})",
            resolution,
            batch,
            measure(lambda: drain(device_pipeline), views, device, seconds),
            "views/s",
            notes=["decoded images resident on the device"],
        )
    )
    copies = "pinned copies" if device.type == "cuda" else "views stay on the host"
    for count in workers:
        loader = torch.utils.data.DataLoader(
            _TorchvisionViews(host.images, image_transform(recipe, recipe.global_crop)),
            batch_size=batch,
            shuffle=True,
            num_workers=count,
            persistent_workers=count > 0,
            pin_memory=device.type == "cuda",
        )
        figures.append(
            Figure(
                "pipeline",
                "torchvision DataLoader (baseline)",
                resolution,
                batch,
                measure(partial(_drain_loader, loader, device), views, device, seconds),
                "views/s",
                workers=count,
                notes=["per-image Dataset, default collate", copies],
            )
        )
        del loader  # its workers exit before the next figure
        worker_pipeline = WorkerPipeline(host, host, recipe, 2, 0, device, seed=0, num_workers=count)
        figures.append(
            Figure(
                "pipeline",
                "workers",
                resolution,
                batch,
                measure(partial(drain, worker_pipeline), views, device, seconds),
                "views/s",
                workers=count,
                notes=[copies],
            )
        )
        worker_pipeline.close()
    return figures


def decode_figures(files: int, device: torch.device, seconds: float) -> list[Figure]:
    from torchvision.io import encode_jpeg, write_file

    from suncet.plugins.datasets.imagefolder import FolderImages

    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i in range(files):
            # ImageNet's typical 500 x 375 photographs; smooth content compresses like a photograph.
            coarse = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(i))
            image = (torch.nn.functional.interpolate(coarse, size=(375, 500), mode="bicubic").clamp(0, 1) * 255).to(
                torch.uint8
            )[0]
            names.append(f"class/{i}.jpg")
            (Path(tmp) / "class").mkdir(exist_ok=True)
            write_file(str(Path(tmp) / names[-1]), encode_jpeg(image, quality=90))
        labels = torch.zeros(files, dtype=torch.long)
        everything = torch.arange(files)
        decoders = ["cpu"] + (["cuda"] if device.type == "cuda" else [])
        for where in decoders:
            source = FolderImages(Path(tmp), names, labels, 256, decode_device=where)
            rate = measure(partial(source.load, everything), files, torch.device(where), seconds)
            note = (
                "one process, torchvision.io.decode_image" if where == "cpu" else "batched nvJPEG (decode_jpeg on cuda)"
            )
            figures.append(Figure("decode", f"jpeg -> 256 px ({where})", 256, files, rate, "images/s", notes=[note]))
    return figures


def write_cifar_files(root: Path, images: int) -> None:
    """Random images in the CIFAR-10 python release format (five training batches, a test batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_batch = -(-images // 5)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        count = per_batch if name != "test_batch" else 10
        content = {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "labels": (np.arange(count) % 10).tolist(),
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(content, handle, protocol=2)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)]}, handle, protocol=2)


def train_figures(
    backbone_name: str, batch: int, steps: int, device: torch.device, workers: list[int], seconds: float
) -> list[Figure]:
    """SimCLR steps (NT-Xent only) on CIFAR-format data through each pipeline and on synthetic views."""
    from suncet.config import TrainConfig
    from suncet.data import TrainBatch
    from suncet.data.samplers import UnlabeledSampler
    from suncet.data.worker_pipeline import WorkerPipeline
    from suncet.methods import MethodConfig
    from suncet.optim import parameter_groups
    from suncet.registry import BACKBONES, DATASETS, METHODS, OPTIMIZERS

    with tempfile.TemporaryDirectory() as tmp:
        write_cifar_files(Path(tmp), batch * steps)
        dataset = DATASETS.create("cifar10", root=tmp, download=False)
    recipe = dataset.recipe
    backbone = BACKBONES.create(backbone_name, in_channels=3, image_size=recipe.global_crop.size)
    sampler = UnlabeledSampler(len(dataset.train), batch, seed=0)
    method = (
        METHODS.get("simclr")
        .obj(backbone, MethodConfig(TrainConfig(suncet_weight=0.0), num_classes=10, steps_per_epoch=steps))
        .to(device)
    )
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    optimizer = OPTIMIZERS.create("lars", parameter_groups(method, 1e-6), lr=0.1, weight_decay=1e-6, momentum=0.9)
    method.train()

    def step(batch_views: TrainBatch) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = method(batch_views)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # as the trainer: it reads every step's loss after the forward, before the backward
        loss.backward()
        optimizer.step()

    images_per_epoch = 2 * batch * sampler.steps_per_epoch
    epochs = iter(range(1_000_000))

    def epoch_through(pipeline) -> Callable[[], None]:
        def run() -> None:
            e = next(epochs)
            plans = [StepPlan(ix, None, None) for ix in sampler.epoch_batches(e)]
            for views in pipeline.batches(plans, e, e * len(plans)):
                step(views)

        return run

    synthetic_views = [torch.randn(batch, 3, 32, 32, device=device) for _ in range(2)]
    synthetic = TrainBatch(global_views=synthetic_views)

    def synthetic_epoch() -> None:
        for _ in range(sampler.steps_per_epoch):
            step(synthetic)

    base = measure(synthetic_epoch, images_per_epoch, device, seconds)
    figures = [Figure("train", "synthetic views on the device", 32, batch, base, "images/s", notes=[backbone_name])]
    train_on_device = dataset.train.to(device)
    feeds = [("device pipeline", DevicePipeline(train_on_device, train_on_device, recipe, 2, 0, device, seed=0), None)]
    feeds += [
        (
            "worker pipeline",
            WorkerPipeline(dataset.train, dataset.train, recipe, 2, 0, device, seed=0, num_workers=n),
            n,
        )
        for n in workers
    ]
    for name, pipeline, count in feeds:
        rate = measure(epoch_through(pipeline), images_per_epoch, device, seconds)
        pipeline.close()
        figures.append(
            Figure(
                "train",
                f"{name}, CIFAR-format files",
                32,
                batch,
                rate,
                "images/s",
                workers=count,
                notes=[backbone_name, f"{100 * rate / base:.0f}% of synthetic"],
            )
        )
    return figures


def machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers, got {shown(text)}") from None


@click.command("data")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--resolution", "resolutions", default="32,96,224", show_default=True, help="Output sides among 32, 96, 224."
)
@click.option(
    "--batch",
    "batch_text",
    help="Images per batch for each resolution, comma-separated [default: 512,256,64 on CPU; 4096,1024,256 on GPU].",
)
@click.option(
    "--workers",
    "workers_text",
    default=None,
    help="Worker counts for the worker path [default: 2 on CPU; 4,12 on GPU].",
)
@click.option("--steps", default=4, show_default=True, help="Steps per pass of the pipeline figures.")
@click.option("--seconds", default=1.0, show_default=True, help="Least timed duration of each figure.")
@click.option(
    "--train/--no-train",
    "with_train",
    default=True,
    show_default=True,
    help="Time SimCLR steps (real vs synthetic data).",
)
@click.option("--train-batch", type=int, help="Images per SimCLR step [default: 32 on CPU, 512 on GPU].")
@click.option(
    "--train-steps",
    type=int,
    help="SimCLR steps per timed epoch [default: 4 on CPU, 16 on GPU]: each epoch "
    "starts on an idle device, so short epochs understate what a pipeline overlaps.",
)
@click.option("--backbone", help="Backbone of the SimCLR figures [default: small_resnet on CPU, resnet18 on GPU].")
@click.option("--decode-files", default=32, show_default=True, help="JPEG files in the decoding figure (0: skip it).")
@click.option(
    "--kornia/--no-kornia",
    "with_kornia",
    default=False,
    show_default=True,
    help="Also time kornia.augmentation with the same recipe (needs kornia installed).",
)
@click.option("--threads", type=int, help="torch intra-op threads of this process [default: torch's choice].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write all figures and the machine here.")
def data(
    device,
    resolutions,
    batch_text,
    workers_text,
    steps,
    seconds,
    with_train,
    train_batch,
    train_steps,
    backbone,
    decode_files,
    with_kornia,
    threads,
    json_path,
):
    """Augmentation, loader, decoding and training-step throughput of the data pipeline."""
    dev, chosen, batches, workers = _settings(
        device, resolutions, batch_text, workers_text, steps, train_steps, with_kornia, threads
    )
    gpu = dev.type == "cuda"
    console = Console()
    figures: list[Figure] = []

    def record(new: list[Figure]) -> None:
        """Print each figure as it lands and rewrite the JSON, so a run cut short keeps what it measured."""
        for f in new:
            workers = "" if f.workers is None else f", {f.workers} workers"
            console.print(
                f"  {f.measurement} / {f.path} / {f.resolution or '-'} px{workers}: {f.rate:,.0f} {f.unit}",
                highlight=False,
            )
        figures.extend(new)
        if json_path:
            write_json(Path(json_path), {"machine": machine(dev), "figures": [asdict(f) for f in figures]})

    for resolution in chosen:
        console.print(f"[dim]augmentation and pipelines at {resolution} px...[/dim]")
        record(augment_figures(resolution, batches[resolution], dev, seconds, with_kornia))
        record(pipeline_figures(resolution, batches[resolution], steps, dev, workers, seconds))
    if decode_files:
        console.print("[dim]decoding...[/dim]")
        record(decode_figures(decode_files, dev, seconds))
    if with_train:
        console.print("[dim]training steps...[/dim]")
        record(
            train_figures(
                backbone or ("resnet18" if gpu else "small_resnet"),
                train_batch or (512 if gpu else 32),
                train_steps or (16 if gpu else 4),
                dev,
                workers,
                seconds,
            )
        )
    _print_table(console, figures, dev)
    if json_path:
        console.print(f"wrote {json_path}")


def _settings(device, resolutions, batch_text, workers_text, steps, train_steps, with_kornia, threads):
    """The checked options: (device, resolutions, batch per resolution, worker counts)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    for option, value in (("--steps", steps), ("--train-steps", train_steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    chosen = _ints(resolutions, "--resolution")
    unknown = sorted(set(chosen) - set(RESOLUTIONS))
    if unknown:
        raise ConfigError(f"--resolution {unknown[0]} is not one of {', '.join(map(str, RESOLUTIONS))}")
    default_batches = {32: 4096, 96: 1024, 224: 256} if gpu else {32: 512, 96: 256, 224: 64}
    batches = dict(zip(chosen, _ints(batch_text, "--batch"))) if batch_text else {r: default_batches[r] for r in chosen}
    if len(batches) != len(chosen):
        raise ConfigError("--batch needs one size per --resolution")
    workers = _ints(workers_text, "--workers") if workers_text else ([4, 12] if gpu else [2])
    if with_kornia:
        try:
            import kornia  # noqa: F401
        except ImportError:
            raise ConfigError("--kornia: kornia is not installed (pip install kornia)") from None
    return dev, chosen, batches, workers


def _print_table(console: Console, figures: list[Figure], dev: torch.device) -> None:
    gpu = dev.type == "cuda"
    table = Table(title=f"suncet bench data on {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if gpu else ""))
    for column in ("measurement", "path", "px", "batch", "workers", "rate", "unit", "notes"):
        table.add_column(column, justify="right" if column in ("px", "batch", "workers", "rate") else "left")
    for f in figures:
        table.add_row(
            f.measurement,
            f.path,
            str(f.resolution or "-"),
            str(f.batch),
            "-" if f.workers is None else str(f.workers),
            f"{f.rate:,.0f}",
            f.unit,
            "; ".join(f.notes),
        )
    console.print(table)
