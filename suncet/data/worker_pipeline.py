"""The CPU path: loader worker processes decode and augment each image with torchvision.

``WorkerPipeline`` has ``DevicePipeline``'s interface. A torch DataLoader whose items are whole
steps runs in ``num_workers`` persistent processes; each worker loads a step's uint8 images
(decoding files there, for image folders) and applies torchvision.transforms.v2 per image
(RandomResizedCrop, flip, ColorJitter, grayscale, blur, solarize) from the same ``AugmentRecipe``
as the device path. Views are stacked straight into shared memory (torch's default_collate),
so they reach the training process without another copy. On a CPU run ToDtype and Normalize
end each image's pipeline in the worker, where the image is still in cache; a CUDA run ships
uint8 views (a quarter of the bytes, over shared memory and PCIe) and normalises the batch on the
GPU. Every image's randomness is seeded from (seed, epoch, step, stream, position, view), so views
depend neither on the number of workers nor on where an epoch was resumed, and there is no
generator state to checkpoint.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from suncet.data.batch import TrainBatch
from suncet.data.pipeline import StepPlan
from suncet.data.recipe import AugmentRecipe, CropSpec, blur_kernel_size
from suncet.data.sources import ImageSource, InMemoryImages
from suncet.errors import ConfigError

UNLABELED_STREAM, LABELED_STREAM = 0, 1
_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def image_seed(*key: int) -> int:
    """A 63-bit seed that is a well-mixed function of the whole key."""
    state = 0
    for part in key:
        state = _splitmix64(state ^ (part & _MASK64))
    return state >> 1


def image_transform(recipe: AugmentRecipe, crop: CropSpec, normalize: bool = True) -> v2.Compose:
    """The recipe as a torchvision v2 pipeline on one uint8 [C, H, W] image: float and normalised
    out, or still uint8 without ``normalize`` (``normalize_views`` then finishes the batch)."""
    steps: list = [v2.RandomResizedCrop(crop.size, scale=crop.scale, ratio=recipe.ratio, antialias=True)]
    if recipe.flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(recipe.flip_p))
    strength = recipe.color_strength
    if strength > 0 and recipe.color_p > 0:
        jitter = v2.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
        steps.append(v2.RandomApply([jitter], p=recipe.color_p))
    if recipe.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(recipe.grayscale_p))
    if recipe.blur_p > 0:
        blur = v2.GaussianBlur(blur_kernel_size(crop.size), sigma=recipe.blur_sigma)
        steps.append(v2.RandomApply([blur], p=recipe.blur_p))
    if recipe.solarize_p > 0:
        # 128 on uint8 is the device path's 0.5 on [0, 1] floats.
        steps.append(v2.RandomSolarize(threshold=128, p=recipe.solarize_p))
    if normalize:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(recipe.mean), list(recipe.std))]
    return v2.Compose(steps)


def normalize_views(views: Tensor, recipe: AugmentRecipe) -> Tensor:
    """torchvision's ToDtype(float32, scale=True) and Normalize on a uint8 [B, C, H, W] batch,
    the same operations in place on one float copy (in a loader worker, a shared-memory one)."""
    if torch.utils.data.get_worker_info() is not None:
        # As default_collate does: the batch crosses to the trainer without another copy.
        template = torch.empty(0, dtype=torch.float32)
        out = template.new(template._typed_storage()._new_shared(views.numel())).resize_(views.shape)
    else:
        out = torch.empty(views.shape, dtype=torch.float32, device=views.device)
    out.copy_(views).mul_(1.0 / 255)  # TF.to_dtype(scale=True): .to(float32).mul_(1 / 255)
    return TF.normalize(out, list(recipe.mean), list(recipe.std), inplace=True)


class _StepViews(Dataset):
    """Item (epoch, step, unlabeled indices, labeled indices) -> that step's views, built in a worker."""

    def __init__(
        self,
        unlabeled: ImageSource,
        labeled: ImageSource,
        recipe: AugmentRecipe,
        global_views: int,
        local_views: int,
        seed: int,
        normalize: bool,
    ):
        self.unlabeled, self.labeled = unlabeled, labeled
        self.global_views, self.local_views = global_views, local_views
        # Views stay uint8 per image; ToDtype and Normalize run once on each collated batch (less
        # time than per image, docs/data.md), here or on the GPU once a quarter of the bytes have
        # crossed (``normalize=False``).
        self.global_transform = image_transform(recipe, recipe.global_crop, normalize=False)
        self.local_transform = image_transform(recipe, recipe.local_crop, normalize=False)
        self.recipe = recipe
        self.normalize = normalize
        self.seed = seed

    def _views(self, images: Tensor, transforms: list[v2.Compose], key: tuple[int, ...]) -> list[Tensor]:
        """Every view of one image before the next image (it stays in cache); one batch per view."""
        views: list[list[Tensor]] = [[] for _ in transforms]
        for position, image in enumerate(images):
            for view, transform in enumerate(transforms):
                # v2 transforms draw from the default CPU generator (and only from it).
                torch.default_generator.manual_seed(image_seed(self.seed, *key, position, view))
                views[view].append(transform(image))
        batches = [default_collate(batch) for batch in views]
        return [normalize_views(batch, self.recipe) for batch in batches] if self.normalize else batches

    def __getitem__(self, item: tuple) -> dict:
        epoch, step, unlabeled, labeled = item
        out: dict = {"global": [], "local": [], "labeled": None}
        # Without workers this runs in the trainer's process: its global RNG is left as it was,
        # and the per-image operations, too small to share between threads, get one thread
        # there as they do in a loader worker.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                if unlabeled is not None:
                    images = self.unlabeled.load(torch.from_numpy(unlabeled)).cpu()
                    transforms = [self.global_transform] * self.global_views + [self.local_transform] * self.local_views
                    views = self._views(images, transforms, (epoch, step, UNLABELED_STREAM))
                    out["global"], out["local"] = views[: self.global_views], views[self.global_views :]
                if labeled is not None:
                    images = self.labeled.load(torch.from_numpy(labeled)).cpu()
                    (out["labeled"],) = self._views(images, [self.global_transform], (epoch, step, LABELED_STREAM))
        finally:
            torch.set_num_threads(threads)
        return out


def leave_stop_requests_to_the_trainer(worker_id: int) -> None:
    """A scheduler signals the whole process group (SLURM's SIGTERM on preemption, a terminal's
    Ctrl-C): a worker ignores the signal and goes on serving steps, so the training process
    reaches its step boundary, writes its checkpoint, and then shuts the workers down."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class _PlannedSteps(Sampler):
    """Hands the loader the items of the epoch being run (set before each pass)."""

    def __init__(self):
        self.items: list[tuple] = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _on_cpu(source: ImageSource) -> ImageSource:
    # Workers are CPU processes: a decoded dataset moved to an accelerator comes back to host memory.
    if isinstance(source, InMemoryImages) and source.images.device.type != "cpu":
        return source.to(torch.device("cpu"))
    return source


def _indices(x: Tensor | None) -> np.ndarray | None:
    # numpy arrays travel to the workers by value, not as shared-memory tensors (one file each).
    return None if x is None else x.cpu().numpy()


class WorkerPipeline:
    """Augment in ``num_workers`` loader processes (0: in this process), deliver on ``device``."""

    def __init__(
        self,
        unlabeled: ImageSource,
        labeled: ImageSource,
        recipe: AugmentRecipe,
        global_views: int,
        local_views: int,
        device: torch.device,
        seed: int,
        num_workers: int = 4,
        prefetch_factor: int = 2,
    ):
        if num_workers < 0:
            raise ConfigError(f"num_workers must be at least 0, got {num_workers}")
        for source in (unlabeled, labeled):
            if getattr(source, "decode_device", "cpu") != "cpu":
                raise ConfigError(
                    "the dataset decodes images on the GPU (decode_device=cuda), but loader workers run on the CPU: "
                    "use the device pipeline, or decode_device=cpu"
                )
        self.device = torch.device(device)
        self.recipe = recipe
        self.normalize_on_arrival = self.device.type != "cpu"
        self.steps = _StepViews(
            _on_cpu(unlabeled),
            _on_cpu(labeled),
            recipe,
            global_views,
            local_views,
            seed,
            normalize=not self.normalize_on_arrival,
        )
        self.sampler = _PlannedSteps()
        self.loader = DataLoader(
            self.steps,
            batch_size=None,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            # The loader draws its workers' base seed from here rather than from the global RNG.
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=leave_stop_requests_to_the_trainer,
        )

    def batches(self, plans: list[StepPlan], epoch: int, first_step: int) -> Iterator[TrainBatch]:
        self.sampler.items = [
            (epoch, first_step + offset, _indices(plan.unlabeled), _indices(plan.labeled))
            for offset, plan in enumerate(plans)
        ]

        def arrived(views: Tensor) -> Tensor:
            views = views.to(self.device, non_blocking=True)
            return normalize_views(views, self.recipe) if self.normalize_on_arrival else views

        for offset, views in enumerate(self.loader):
            plan = plans[offset]
            batch = TrainBatch(
                global_views=[arrived(v) for v in views["global"]],
                local_views=[arrived(v) for v in views["local"]],
                epoch=epoch,
                step=first_step + offset,
            )
            if views["labeled"] is not None:
                batch.labeled = arrived(views["labeled"])
                batch.labels = plan.labels.to(self.device, non_blocking=True)
            yield batch

    def close(self) -> None:
        """Stop the loader processes now, not whenever the pipeline is collected (at interpreter
        exit, a CUDA process tearing down persistent workers and their pinning thread can hang)."""
        iterator = self.loader._iterator  # DataLoader keeps its persistent workers' iterator here
        if iterator is not None:
            iterator._shutdown_workers()
            self.loader._iterator = None

    def state_dict(self) -> dict:
        # Views are a pure function of (seed, epoch, step, position, view): nothing to restore.
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
