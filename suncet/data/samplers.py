"""The two streams of a step: shuffled unlabeled images, and class-stratified labeled images.

Both are pure functions of (seed, position), so a resumed run draws exactly what the
uninterrupted run would have drawn, and every rank agrees on the classes of a step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from suncet.errors import ConfigError


class UnlabeledSampler:
    """An epoch is one shuffled pass over all unlabeled images, split into equal batches.

    With several ranks each takes a disjoint strided shard of the epoch's permutation; the
    incomplete last batch is dropped so that every rank runs the same number of steps.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size * world_size > size:
            raise ConfigError(
                f"--batch-size {batch_size} x {world_size} rank(s) is larger than the {size} unlabeled images"
            )
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def epoch_batches(self, epoch: int) -> Tensor:
        """This rank's batches of ``epoch``: [steps_per_epoch, batch_size] indices."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=generator)
        used = self.steps_per_epoch * self.batch_size * self.world_size
        return order[:used].view(self.steps_per_epoch, self.world_size, self.batch_size)[:, self.rank]


class ClassStratifiedSampler:
    """Each step: K classes, n labeled images of each (method.md section 4).

    Classes come from a sequence of seeded permutations shared by all ranks; each rank draws
    images from its own share of every class's labeled images, cycling through a reshuffle
    whenever its share of a class runs out (so a class with fewer than n images repeats an
    image, seen under another augmentation). ``state_dict`` holds the position for resuming.
    """

    def __init__(
        self,
        labels: Tensor,
        classes_per_step: int,
        images_per_class: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        y = labels.cpu().numpy()
        self.classes = np.unique(y)
        if classes_per_step < 1 or images_per_class < 1:
            raise ConfigError("--classes-per-step and --images-per-class must be at least 1")
        if classes_per_step > len(self.classes):
            raise ConfigError(
                f"--classes-per-step {classes_per_step} is more than the {len(self.classes)} classes "
                "that have labeled images"
            )
        self.classes_per_step = classes_per_step
        self.images_per_class = images_per_class
        self.seed = seed
        self.rank = rank
        self.shares = {}
        for c in self.classes:
            ix = np.flatnonzero(y == c)
            self.shares[int(c)] = ix[rank::world_size] if len(ix) >= world_size else ix[rank % len(ix) :: len(ix)]
        self.step = 0
        self.draws = {int(c): 0 for c in self.classes}
        self._cycle_orders: dict[int, tuple[int, np.ndarray]] = {}

    def _classes_of_step(self, step: int) -> np.ndarray:
        per_round = len(self.classes) // self.classes_per_step
        round_index, slot = divmod(step, per_round)
        order = np.random.default_rng([self.seed, 1, round_index]).permutation(self.classes)
        return order[slot * self.classes_per_step : (slot + 1) * self.classes_per_step]

    def _share_order(self, c: int, cycle: int) -> np.ndarray:
        cached = self._cycle_orders.get(c)
        if cached is None or cached[0] != cycle:
            order = np.random.default_rng([self.seed, 2, self.rank, c, cycle]).permutation(len(self.shares[c]))
            cached = self._cycle_orders[c] = (cycle, order)
        return cached[1]

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """Positions (into the labels given at construction) and classes of the next step."""
        classes = self._classes_of_step(self.step)
        picked = []
        for c in map(int, classes):
            share = self.shares[c]
            for k in range(self.draws[c], self.draws[c] + self.images_per_class):
                cycle, offset = divmod(k, len(share))
                picked.append(share[self._share_order(c, cycle)[offset]])
            self.draws[c] += self.images_per_class
        self.step += 1
        positions = torch.tensor(picked, dtype=torch.long)
        return positions, torch.from_numpy(np.repeat(classes, self.images_per_class)).long()

    def state_dict(self) -> dict:
        return {"step": self.step, "draws": dict(self.draws)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.draws = {int(c): int(n) for c, n in state["draws"].items()}
