"""Turning a step's image indices into augmented views on the training device.

The engine plans an epoch as a list of ``StepPlan`` (which unlabeled and labeled images each
step uses); a ``Pipeline`` turns each plan into a ``TrainBatch``. ``DevicePipeline`` moves uint8
batches to the training device and augments them there, batched, with per-sample parameters
from one seeded generator whose state the checkpoint keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from suncet.data.augment import BatchAugment
from suncet.data.batch import TrainBatch
from suncet.data.image_batch import images_to
from suncet.data.recipe import AugmentRecipe
from suncet.data.sources import ImageSource
from suncet.data.transfer import to_device
from suncet.errors import CheckpointError


@dataclass
class StepPlan:
    unlabeled: Tensor | None  # indices into the unlabeled stream
    labeled: Tensor | None  # indices into the training split
    labels: Tensor | None  # their classes


class Pipeline(Protocol):
    """Turns planned steps into batches on the training device; its state resumes exactly."""

    def batches(self, plans: list[StepPlan], epoch: int, first_step: int) -> Iterator[TrainBatch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


class DevicePipeline:
    """Load uint8 images, move them to ``device``, and augment them there in one call per view."""

    def __init__(
        self,
        unlabeled: ImageSource,
        labeled: ImageSource,
        recipe: AugmentRecipe,
        global_views: int,
        local_views: int,
        device: torch.device,
        seed: int,
    ):
        self.unlabeled, self.labeled = unlabeled, labeled
        self.global_views, self.local_views = global_views, local_views
        self.global_augment = BatchAugment(recipe, recipe.global_crop)
        self.local_augment = BatchAugment(recipe, recipe.local_crop)
        self.device = device
        # Parameters are drawn on the host and reach the device in one copy per view.
        self.generator = torch.Generator().manual_seed(seed)

    def _view(self, augment: BatchAugment, images: Tensor) -> Tensor:
        view = augment(images, self.generator)
        # On GPUs the model runs channels_last (NHWC convolutions), so the inputs match it.
        return view.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else view

    def batches(self, plans: list[StepPlan], epoch: int, first_step: int) -> Iterator[TrainBatch]:
        for offset, plan in enumerate(plans):
            batch = TrainBatch(global_views=[], epoch=epoch, step=first_step + offset)
            if plan.unlabeled is not None:
                images = images_to(self.unlabeled.load(plan.unlabeled), self.device)
                batch.global_views = [self._view(self.global_augment, images) for _ in range(self.global_views)]
                batch.local_views = [self._view(self.local_augment, images) for _ in range(self.local_views)]
            if plan.labeled is not None:
                images = images_to(self.labeled.load(plan.labeled), self.device)
                batch.labeled = self._view(self.global_augment, images)
                batch.labels = to_device(plan.labels, self.device)
            yield batch

    def close(self) -> None:
        """Nothing to release."""

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.generator.set_state(state["generator"])
        except RuntimeError as exc:
            # Checkpoints of CUDA runs by older versions hold a CUDA generator's state.
            raise CheckpointError(
                "the checkpoint's augmentation generator state does not fit this version's host generator "
                f"({exc}); start the run again, or resume it with the suncet version that wrote it"
            ) from exc


def images_in(plan: StepPlan) -> int:
    return sum(len(x) for x in (plan.unlabeled, plan.labeled) if x is not None)
