"""TensorBoard event files in RUN/tensorboard, through torch.utils.tensorboard."""

from __future__ import annotations

from suncet.config import to_yaml
from suncet.errors import ConfigError
from suncet.loggers import Logger
from suncet.registry import register_logger

DIRECTORY = "tensorboard"


@register_logger("tensorboard")
class TensorBoardLogger(Logger):
    """TensorBoard scalars per step (step/...) and per epoch (epoch/...), and the config as text."""

    def __init__(self, *, run_dir, config, epoch, step):
        super().__init__(run_dir=run_dir, config=config, epoch=epoch, step=step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--logger tensorboard needs the tensorboard package: pip install 'suncet[tensorboard]'"
            ) from None
        # Every scalar is recorded at its global step, so purging from the resumed step hides
        # what the interrupted process logged after its checkpoint, epoch scalars included.
        self.writer = SummaryWriter(str(self.run_dir / DIRECTORY), purge_step=step)
        if step == 0:
            # Four spaces: a Markdown code block, which TensorBoard's text tab shows verbatim.
            self.writer.add_text("config", "    " + to_yaml(config).replace("\n", "\n    "), 0)

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(f"step/{key}", value, step)

    def log_epoch(self, epoch: int, row: dict) -> None:
        for key, value in row.items():
            if key not in ("epoch", "step") and value is not None:
                self.writer.add_scalar(f"epoch/{key}", value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
