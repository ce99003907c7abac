"""Checkpoints: what they hold, how a run is restored from one, and their files (written
atomically, kept in rotation, loaded with clear errors, found again after a crash)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from suncet import distributed
from suncet.config import TrainConfig, renamed_keys
from suncet.engine.files import fsync_directory, write_atomic
from suncet.errors import CheckpointError, ConfigError, shown, what_is_at
from suncet.registry import METHODS, plugin_code

if TYPE_CHECKING:
    from suncet.data.pipeline import Pipeline
    from suncet.engine.run import Run

LAST = "last.pt"
# How torch's weights-only unpickler reports a global or a call it refuses (as opposed to bytes
# that are no pickle at all: "invalid load key").
_ASKS_FOR_CODE = re.compile(
    r"Unsupported global|whose module \S+ is blocked|call reduce for unrecognized|Can only create new object"
)
_NUMBERED = re.compile(r"^step-(\d+)\.pt$")


_EVERY = re.compile(r"^\s*(\d+)\s*(epochs?|steps?|min|minutes?)\s*$")


def parse_every(text: str) -> tuple[int, str]:
    """``'2epochs'``, ``'500steps'``, ``'10min'`` -> (count, unit) with unit epoch, step or min."""
    m = _EVERY.match(str(text))
    if not m or int(m.group(1)) < 1:
        raise ConfigError(
            f"checkpoint-every must be a positive count of epochs, steps or minutes (1epoch, 500steps, 10min), got {shown(text)}"
        )
    return int(m.group(1)), {"e": "epoch", "s": "step", "m": "min"}[m.group(2)[0]]


class CheckpointPolicy:
    """When to write a checkpoint: every N epochs, every N steps, or every N minutes."""

    def __init__(self, every: str):
        self.count, self.unit = parse_every(every)
        self.last_save = time.monotonic()

    def step_due(self, global_step: int) -> bool:
        return self.unit == "step" and global_step % self.count == 0

    def minutes_due(self) -> bool:
        return self.unit == "min" and time.monotonic() - self.last_save >= 60 * self.count

    def after_epoch(self, epoch: int) -> bool:
        return self.unit == "epoch" and epoch % self.count == 0

    def saved(self) -> None:
        self.last_save = time.monotonic()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` so that ``path`` holds either the old or the new checkpoint, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint holding only tensors and plain data (no pickled code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} {what_is_at(path)}" + (", not a checkpoint file" if path.exists() else "")
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) and _ASKS_FOR_CODE.search(str(exc)):
            reason = "it asks to run code, which a checkpoint never does (refused, nothing was run)"
        elif not _looks_saved_by_torch(path):
            reason = "it is not a file torch.save writes"
        else:
            reason = (
                re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()[0][:120]
                if str(exc).strip()
                else type(exc).__name__
            )
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a checkpoint: {reason})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not a suncet training checkpoint")
    if isinstance(state["model"], dict):
        state["model"] = {_current_name(k): v for k, v in state["model"].items()}
    return state


# Model tensors of older versions under their current names: the cross-entropy classifier is
# the labeled term's head since 0.2.
_RENAMED_PREFIXES = {"label_head.": "labeled_term.head."}


def _current_name(key: object) -> object:
    for old, new in _RENAMED_PREFIXES.items():
        if isinstance(key, str) and key.startswith(old):
            return new + key[len(old) :]
    return key


def _looks_saved_by_torch(path: Path) -> bool:
    """Whether the file starts as torch.save's zip archive or a legacy pickle does."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def numbered_checkpoints(directory: Path) -> list[Path]:
    """The step-numbered checkpoints in ``directory``, oldest first."""
    if not Path(directory).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := _NUMBERED.match(p.name))]
    return [p for _, p in sorted(found)]


def save_rotating(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save ``step-<step>.pt``, point ``last.pt`` at it (a hard link, swapped in atomically),
    and delete all but the newest ``keep`` numbered checkpoints."""
    directory = Path(directory)
    path = directory / f"step-{step:09d}.pt"
    save_checkpoint(path, state)
    # An unpredictable name, made by os.link itself (which never replaces anything).
    link = directory / f".{LAST}.link-{secrets.token_hex(4)}"
    os.link(path, link)
    os.replace(link, directory / LAST)
    fsync_directory(directory)
    for old in numbered_checkpoints(directory)[:-keep]:
        old.unlink()
    return path


def newest_loadable(directory: Path, report=None, set_aside: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads, skipping (and reporting) broken ones;
    with ``set_aside`` a broken one is renamed ``<name>.unreadable`` (kept, out of the rotation)."""
    candidates = [Path(directory) / LAST] + list(reversed(numbered_checkpoints(directory)))
    for path in candidates:
        if not path.is_file():
            continue
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            kept = _keep_aside(path) if set_aside else None
            if report is not None:
                report(f"skipping {exc}" + (f"; kept as {kept.name}" if kept else ""))
    return None


def _keep_aside(path: Path) -> Path:
    """Rename a broken checkpoint out of the rotation to ``<name>.unreadable`` (``.unreadable-2``,
    ... when that is taken): a file reported as kept is never replaced by a later one."""
    for attempt in itertools.count(1):
        kept = path.with_name(path.name + ".unreadable" + (f"-{attempt}" if attempt > 1 else ""))
        try:
            os.link(path, kept)  # never replaces an existing file, unlike a rename
        except FileExistsError:
            continue
        path.unlink()
        fsync_directory(path.parent)
        return kept


def checkpoint_state(run: Run, pipeline: Pipeline, progress: dict, meters: dict, sampler_state: dict | None) -> dict:
    """Everything needed to continue exactly; every rank's own streams are gathered (call on all ranks)."""
    with plugin_code(METHODS.get(run.config.method), "rank_state"):
        method_state = run.method.rank_state()
    rank_states = distributed.all_gather_objects(
        {"pipeline": pipeline.state_dict(), "labeled_sampler": sampler_state, "meters": meters, "method": method_state}
    )
    state = {
        "model": run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "config": dataclasses.asdict(run.config),
        "labeled": run.labeled.clone(),
        "progress": progress,
        "backbone_args": run.backbone_args,
        "evaluated": evaluated_module(run.method),  # where export finds the network evaluation uses
        "normalisation": run.dataset.recipe.normalisation(),  # what an exported backbone's inputs need
        "rng": {"torch": torch.get_rng_state()},
        # Per rank: the augmentation generator, the labeled sampler's position at the start of the
        # checkpoint's epoch (the epoch's plan is drawn again from there on resume), and the
        # loss sums of the epoch so far.
        "ranks": rank_states,
    }
    if run.device.type == "cuda":
        state["rng"]["cuda"] = torch.cuda.get_rng_state(run.device)
    return state


def restore(run: Run, state: dict, pipeline: Pipeline) -> tuple[dict, dict]:
    """Load ``state`` into the run and pipeline; returns (progress, this rank's meters)."""
    run.method.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and run.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], run.device)
    mine = state["ranks"][distributed.rank()]
    with plugin_code(METHODS.get(run.config.method), "load_rank_state"):
        run.method.load_rank_state(mine["method"])
    pipeline.load_state_dict(mine["pipeline"])
    if run.labeled_sampler is not None and mine["labeled_sampler"] is not None:
        run.labeled_sampler.load_state_dict(mine["labeled_sampler"])
    return dict(state["progress"]), mine["meters"]


def evaluated_module(method) -> str:
    """Where ``method.evaluated_backbone()`` sits in the method (a state-dict prefix without its
    dot: "backbone" by default); it must be one of the method's submodules."""
    with plugin_code(METHODS.get(method.config.train.method), "evaluated_backbone"):
        network = method.evaluated_backbone()
    for name, module in method.named_modules():
        if module is network and name:
            return name
    raise ConfigError(
        f"method {type(method).__name__}'s evaluated_backbone() is not one of its submodules; return "
        "a network the method holds (docs/plugins.md)"
    )


def check_compatible(config: TrainConfig, state: dict, source: Path) -> None:
    """A checkpoint must come from as many processes as this run has (each restores its own
    streams) and from a run with this very configuration (as fitted to the data and scaled to
    the processes)."""
    if len(state["ranks"]) != distributed.world_size():
        raise CheckpointError(
            f"the checkpoint was written by {len(state['ranks'])} process(es); resume it with as many (now {distributed.world_size()})"
        )
    # A setting added after the checkpoint was written held its default in that run. The preset
    # names where settings came from (runs before 0.2 did not record it); the settings compared
    # are what it applied.
    saved = {**dataclasses.asdict(TrainConfig()), **renamed_keys(state["config"])}
    current = dataclasses.asdict(config)
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and k != "preset")
    if differing:
        key = differing[0]
        raise CheckpointError(
            f"checkpoint in {source} belongs to another configuration: {key} is {shown(saved.get(key))} there "
            f"but {shown(current.get(key))} here" + (f" (and {len(differing) - 1} more)" if len(differing) > 1 else "")
        )


def check_state_matches(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse, in one line, a checkpoint whose tensors are not the ones the model its settings
    describe has (names and shapes; ``expected`` may be a meta-device model's state)."""
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    shapes = [k for k in expected if k in saved and tuple(expected[k].shape) != tuple(saved[k].shape)]
    if not (missing or extra or shapes):
        return
    if shapes:
        key = shapes[0]
        first = f"{key} is {list(saved[key].shape)} there but {list(expected[key].shape)} here"
    elif missing:
        first = f"it has no {missing[0]}"
    else:
        first = f"it holds {extra[0]}, which the model does not have"
    more = len(missing) + len(extra) + len(shapes) - 1
    raise CheckpointError(
        f"{source} does not match the model its settings describe: {first}"
        + (f" (and {more} more)" if more else "")
        + " (settings edited, or written by another version?)"
    )


def find_checkpoint(directory: Path, fallback: bool, report=None) -> dict | None:
    """The checkpoint to resume from: ``last.pt`` (an error if it cannot be read); with
    ``fallback``, or when there is no ``last.pt``, the newest one that loads (broken ones are
    skipped and reported), or None when there is none (the run then starts afresh)."""
    directory = Path(directory)
    if not fallback and (directory / LAST).exists():
        return load_checkpoint(directory / LAST)
    # No last.pt yet: a crash between writing the first numbered checkpoint and linking it.
    found = newest_loadable(directory, report, set_aside=fallback)
    if found is None:
        return None
    path, state = found
    if report is not None:
        report(f"resuming from {path}")
    return state
