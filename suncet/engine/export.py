"""A run's pre-trained backbone, loaded back or written out for other libraries.

    torchvision   a state_dict for the torchvision model the backbone is (``equivalents``)
    timm          the same, for ``timm.create_model(<name>)``
    safetensors   any backbone: its weights, with what builds it again in the file's metadata;
                  ``load_backbone`` reads it with no pickle

A backbone plugin whose module is a torchvision or timm model sets ``equivalents`` (format ->
how to build that model) and ``equivalent_state_dict()`` (its weights under that model's names).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import suncet
from suncet.config import TrainConfig
from suncet.engine import rundir
from suncet.engine.assemble import backbone_args_of, build_backbone, load_dataset
from suncet.engine.evaluate import check_finite
from suncet.engine.state import load_checkpoint
from suncet.errors import ConfigError

FORMATS = ("safetensors", "torchvision", "timm")
METADATA_KEY = "suncet.backbone"
# Bumped when the metadata's meaning changes; a reader refuses versions it does not know.
DESCRIPTION_VERSION = 1
_SAFETENSORS_HINT = "reading and writing .safetensors files needs the safetensors package: pip install 'suncet[safetensors]'"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ConfigError(_SAFETENSORS_HINT) from None
    return safetensors


def _from_run(run_dir: Path) -> tuple[nn.Module, dict]:
    """The backbone of a run's last checkpoint and the description of it an export carries."""
    config = rundir.load_run_config(run_dir)
    state = load_checkpoint(run_dir / rundir.LAST_CHECKPOINT)
    check_finite(state["model"], run_dir)
    # Checkpoints from before suncet recorded the input shape and normalisation learn them from the dataset.
    dataset = None if "backbone_args" in state and "normalisation" in state else load_dataset(config)
    args = state.get("backbone_args") or backbone_args_of(config, dataset)
    normalisation = state.get("normalisation") or dataset.recipe.normalisation()
    backbone = build_backbone(config, args)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)})
    return backbone, describe(config, args, backbone, normalisation)


def describe(config: TrainConfig, args: dict, backbone: nn.Module, normalisation: dict) -> dict:
    return {
        "version": DESCRIPTION_VERSION,
        "suncet": suncet.__version__,
        "backbone": config.backbone,
        "options": dict(config.backbone_options),
        "in_channels": args["in_channels"],
        "image_size": args["image_size"],
        "feature_dim": backbone.feature_dim,
        **normalisation,
        "dataset": config.dataset,
        "method": config.method,
    }


def _from_safetensors(path: Path) -> nn.Module:
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            weights = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # the library reports a damaged header in its own exception types
        raise ConfigError(f"{path} cannot be read as a safetensors file: {str(exc).strip().splitlines()[0][:200]}") from None
    if METADATA_KEY not in metadata:
        raise ConfigError(f"{path} is a safetensors file but not a suncet backbone export (no '{METADATA_KEY}' metadata)")
    info = json.loads(metadata[METADATA_KEY])
    if info.get("version") != DESCRIPTION_VERSION:
        raise ConfigError(f"{path} was exported by suncet {info.get('suncet', '?')} in a format this version cannot read")
    from suncet.registry import BACKBONES

    backbone = BACKBONES.create(info["backbone"], options=info["options"], in_channels=info["in_channels"],
                                image_size=info["image_size"])
    backbone.load_state_dict(weights)
    return backbone


def load_backbone(source: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """The pre-trained backbone in eval mode on ``device``, from a run directory (its last
    checkpoint) or from a ``.safetensors`` file that ``suncet export`` wrote (read without pickle)."""
    source = Path(source)
    if source.is_dir():
        backbone = _from_run(source)[0]
    elif source.is_file():
        backbone = _from_safetensors(source)
    else:
        raise ConfigError(f"{source}: no such run directory or exported backbone file")
    return backbone.to(device).eval()


@dataclass
class Exported:
    path: Path
    load_with: str  # one line of Python that builds the model the file loads into


def _write_atomic(out: Path, save) -> None:
    """``save(tmp)`` then rename: an interrupted export leaves no half-written file under ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export_backbone(run_dir: Path | str, format: str = "safetensors", out: Path | str | None = None) -> Exported:
    """Write the backbone of ``run_dir`` as ``format`` to ``out`` (default: in the run directory)."""
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got '{format}'")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    backbone, info = _from_run(run_dir)
    out = Path(out) if out is not None else run_dir / ("backbone.safetensors" if format == "safetensors" else f"backbone-{format}.pt")
    if format == "safetensors":
        weights = {k: v.contiguous() for k, v in backbone.state_dict().items()}
        save_file = _safetensors().torch.save_file
        _write_atomic(out, lambda tmp: save_file(weights, str(tmp), metadata={METADATA_KEY: json.dumps(info)}))
        return Exported(out, f"backbone = suncet.load_backbone('{out}')")
    if format not in getattr(backbone, "equivalents", {}):
        raise ConfigError(
            f"backbone '{info['backbone']}' has no {format} equivalent; export it with --format safetensors "
            "and load it with suncet.load_backbone"
        )
    _write_atomic(out, lambda tmp: torch.save(backbone.equivalent_state_dict(), tmp))
    # strict=False: the file has no classifier, which the library's model has.
    return Exported(out, f"{backbone.equivalents[format]}; model.load_state_dict(torch.load('{out}'), strict=False)")
