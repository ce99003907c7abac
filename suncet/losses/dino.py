"""DINO's self-distillation loss (Caron et al. 2021): the teacher's centred, sharpened softmax
of each global crop as the target of the student's softmax of every other crop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suncet.distributed import all_reduce_sum, world_size
from suncet.losses import checks


class DINOLoss(nn.Module):
    """DINO's cross-entropy between teacher and student outputs, called as
    ``loss(teacher_out, student_out, teacher_temp=None, epoch=None)``.

    ``teacher_out`` holds the teacher's outputs [B, output_dim] of the global crops, one tensor
    per crop; ``student_out`` the student's of every crop, the same global crops first, in the
    same order. Each teacher crop's softmax of ``(out - center) / teacher temperature`` (no
    gradient: a target, as the authors' code detaches it) is compared with the student's
    log-softmax at ``student_temp`` of every crop but the same one; the mean over those pairs
    and the batch. The teacher temperature is ``teacher_temp`` when given, else the epoch's on a
    linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over
    ``warmup_teacher_temp_epochs`` epochs (the epoch's own value from the last one of the
    warm-up on), else ``teacher_temp``.

    After each call in training mode, the ``center`` buffer [1, 1, output_dim] moves towards the
    teacher outputs' mean with momentum ``center_momentum``; under torch.distributed the mean
    runs over every rank's rows. In eval mode the center stays, as BatchNorm's statistics do.

    Equals ``lightly.loss.DINOLoss(output_dim, warmup_teacher_temp, teacher_temp,
    warmup_teacher_temp_epochs, student_temp, center_momentum)`` in value, student gradient and
    center (lightly's buffer has the same name and shape), and the authors' ``DINOLoss`` of
    main_dino.py (called there with the student's outputs first).
    """

    def __init__(
        self,
        output_dim: int = 65536,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_mode: str = "mean",
    ):
        super().__init__()
        self.output_dim = checks.integer("output_dim", output_dim, 1)
        self.warmup_teacher_temp = checks.temperature("warmup_teacher_temp", warmup_teacher_temp)
        self.teacher_temp = checks.temperature("teacher_temp", teacher_temp)
        self.warmup_teacher_temp_epochs = checks.integer("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, 0)
        self.student_temp = checks.temperature("student_temp", student_temp)
        self.center_momentum = checks.fraction("center_momentum", center_momentum, high_inclusive=True)
        self.center_mode = checks.choice("center_mode", center_mode, ("mean",))
        self.register_buffer("center", torch.zeros(1, 1, self.output_dim))

    def extra_repr(self) -> str:
        return (
            f"output_dim={self.output_dim}, warmup_teacher_temp={self.warmup_teacher_temp}, "
            f"teacher_temp={self.teacher_temp}, warmup_teacher_temp_epochs={self.warmup_teacher_temp_epochs}, "
            f"student_temp={self.student_temp}, center_momentum={self.center_momentum}"
        )

    def teacher_temperature(self, epoch: int | None = None) -> float:
        """The teacher temperature of ``epoch`` (0-based): np.linspace(warmup_teacher_temp,
        teacher_temp, warmup_teacher_temp_epochs)[epoch] during the warm-up, then teacher_temp."""
        if epoch is None:
            return self.teacher_temp
        epoch = checks.integer("epoch", epoch, 0)
        warmup = self.warmup_teacher_temp_epochs
        if epoch >= warmup:
            return self.teacher_temp
        if warmup == 1:
            return self.warmup_teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * epoch / (warmup - 1)

    def forward(
        self,
        teacher_out: Sequence[Tensor],
        student_out: Sequence[Tensor],
        teacher_temp: float | None = None,
        epoch: int | None = None,
    ) -> Tensor:
        teachers, students = list(teacher_out), list(student_out)
        for name, crops in (("teacher_out", teachers), ("student_out", students)):
            for i, out in enumerate(crops):
                checks.embeddings(f"{name}[{i}]", out, width=self.output_dim)
        if not teachers or not students or len(teachers) * len(students) - min(len(teachers), len(students)) == 0:
            raise ValueError(
                f"DINO compares each teacher crop with every other student crop: it needs a teacher crop and two "
                f"crops in all, got {len(teachers)} teacher and {len(students)} student crop(s)"
            )
        rows = teachers[0].shape[0]
        for name, crops in (("teacher_out", teachers), ("student_out", students)):
            for i, out in enumerate(crops):
                if out.shape[0] != rows:
                    raise ValueError(f"{name}[{i}] must have {rows} rows like teacher_out[0], got {out.shape[0]}")
        temperature = (
            self.teacher_temperature(epoch)
            if teacher_temp is None
            else checks.temperature("teacher_temp", teacher_temp)
        )
        # At least fp32: a softmax over tens of thousands of outputs in bf16 loses the target.
        dtype = torch.promote_types(torch.promote_types(teachers[0].dtype, students[0].dtype), torch.float32)
        teacher = torch.stack(teachers).detach().to(dtype)  # [t, B, D]
        student = torch.stack(students).to(dtype)  # [s, B, D]
        targets = F.softmax((teacher - self.center.to(dtype)) / temperature, dim=-1)
        log_predictions = F.log_softmax(student / self.student_temp, dim=-1)
        cross = -torch.einsum("tbd,sbd->ts", targets, log_predictions)  # summed over the batch
        # Same crop index of teacher and student: the same view, left out (no host read, for
        # torch.compile: the pair count is known from the shapes).
        other = ~torch.eye(*cross.shape, dtype=torch.bool, device=cross.device)
        loss = torch.where(other, cross, 0.0).sum() / ((cross.numel() - min(cross.shape)) * rows)
        if self.training:
            self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """center = m * center + (1 - m) * the mean of ``teacher_out`` [crops, B, D] over its
        crops, rows and every rank's rows."""
        batch_center = all_reduce_sum(teacher_out.sum(dim=(0, 1), keepdim=True))
        batch_center = batch_center / (teacher_out.shape[0] * teacher_out.shape[1] * world_size())
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.center_momentum)
