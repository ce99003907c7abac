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
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import suncet
from suncet.config import TrainConfig
from suncet.engine import rundir
from suncet.engine.assemble import backbone_args_of, load_dataset
from suncet.engine.evaluate import check_finite
from suncet.engine.files import write_atomic
from suncet.engine.state import check_state_matches, load_checkpoint
from suncet.errors import ConfigError, SuncetError, shown, what_is_at

FORMATS = ("safetensors", "torchvision", "timm")
METADATA_KEY = "suncet.backbone"
# Bumped when the metadata's meaning changes; a reader refuses versions it does not know.
DESCRIPTION_VERSION = 1
# Bounds on what a file may declare of its inputs, checked before a model is built from it.
MAX_CHANNELS = 1024
MAX_IMAGE_SIZE = 16384
_SAFETENSORS_HINT = (
    "reading and writing .safetensors files needs the safetensors package: pip install 'suncet[safetensors]'"
)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ConfigError(_SAFETENSORS_HINT) from None
    return safetensors


def _checked_description(info: object, source: Path) -> dict:
    """What builds a backbone, as a file states it: each value of its type and in range."""
    if not isinstance(info, dict):
        raise ConfigError(f"{source}: the backbone description is not a mapping")

    def refuse(key: str, rule: str) -> None:
        raise ConfigError(f"{source}: backbone {key} must be {rule}, got {shown(info.get(key))}")

    def whole(key: str, high: int) -> None:
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            refuse(key, f"an integer in [1, {high}]")

    if not isinstance(info.get("backbone"), str) or not info["backbone"]:
        refuse("backbone", "a plugin name")
    if not isinstance(info.get("options"), dict):
        refuse("options", "a mapping of the plugin's options")
    whole("in_channels", MAX_CHANNELS)
    whole("image_size", MAX_IMAGE_SIZE)
    for key, low in (("mean", -math.inf), ("std", 0.0)):
        values = info.get(key)
        if not (
            isinstance(values, list)
            and len(values) == info["in_channels"]
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > low for v in values
            )
        ):
            refuse(
                key, f"{info['in_channels']} finite numbers (one per input channel){', each > 0' if low == 0 else ''}"
            )
    return info


def _backbone_holding(info: dict, weights: dict[str, Tensor], source: Path) -> nn.Module:
    """The backbone ``info`` describes, holding ``weights``: the one way a backbone is loaded
    from a file. Its weights must be finite, and a model built first on the meta device (no
    memory) must name and shape every tensor as the file does, so no declared size can make
    suncet allocate more than the file holds."""
    from suncet.registry import BACKBONES

    check_finite(weights, source)

    def build() -> nn.Module:
        return BACKBONES.create(
            info["backbone"], options=info["options"], in_channels=info["in_channels"], image_size=info["image_size"]
        )

    try:
        with torch.device("meta"):
            shell = build()
    except SuncetError:
        raise
    except Exception as exc:  # a plugin's own error while building from stated options
        raise ConfigError(
            f"{source}: backbone '{info['backbone']}' cannot be built from {shown(info['options'])}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        ) from None
    check_state_matches(shell.state_dict(), weights, source)
    backbone = build()
    backbone.load_state_dict(weights)
    return backbone


def _from_run(run_dir: Path) -> tuple[nn.Module, dict]:
    """The backbone of a run's last checkpoint and the description of it an export carries."""
    config = rundir.load_run_config(run_dir)
    checkpoint = run_dir / rundir.LAST_CHECKPOINT
    state = load_checkpoint(checkpoint)
    # Checkpoints from before suncet recorded the input shape and normalisation learn them from the dataset.
    dataset = None if "backbone_args" in state and "normalisation" in state else load_dataset(config)
    args = state.get("backbone_args") or backbone_args_of(config, dataset)
    normalisation = state.get("normalisation") or dataset.recipe.normalisation()
    info = _checked_description(describe(config, args, normalisation), checkpoint)
    # The network the method names for evaluation (Method.evaluated_backbone; older checkpoints: the backbone).
    prefix = f"{state.get('evaluated', 'backbone')}."
    weights = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    backbone = _backbone_holding(info, weights, checkpoint)
    return backbone, {**info, "feature_dim": backbone.feature_dim}


def describe(config: TrainConfig, args: dict, normalisation: dict) -> dict:
    return {
        "version": DESCRIPTION_VERSION,
        "suncet": suncet.__version__,
        "backbone": config.backbone,
        "options": dict(config.backbone_options),
        "in_channels": args.get("in_channels"),
        "image_size": args.get("image_size"),
        "mean": normalisation.get("mean"),
        "std": normalisation.get("std"),
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
        raise ConfigError(
            f"{path} cannot be read as a safetensors file: {str(exc).strip().splitlines()[0][:200]}"
        ) from None
    if METADATA_KEY not in metadata:
        raise ConfigError(
            f"{path} is a safetensors file but not a suncet backbone export (no '{METADATA_KEY}' metadata)"
        )
    try:
        info = json.loads(metadata[METADATA_KEY])
    except ValueError:
        raise ConfigError(f"{path}: the '{METADATA_KEY}' metadata is not JSON") from None
    if not isinstance(info, dict) or info.get("version") != DESCRIPTION_VERSION:
        found = info.get("suncet", "?") if isinstance(info, dict) else "?"
        raise ConfigError(f"{path} was exported by suncet {shown(found)} in a format this version cannot read")
    return _backbone_holding(_checked_description(info, path), weights, path)


def load_backbone(source: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """The pre-trained backbone in eval mode on ``device``, from a run directory (its last
    checkpoint) or from a ``.safetensors`` file that ``suncet export`` wrote (read without pickle);
    both through the same checks (finite weights, sizes and tensors matching the description)."""
    source = Path(source)
    if source.is_dir():
        backbone = _from_run(source)[0]
    elif source.is_file():
        backbone = _from_safetensors(source)
    else:
        raise ConfigError(
            f"{source}: no such run directory or exported backbone file"
            if not source.exists()
            else f"{source} {what_is_at(source)}, not a run directory or an exported backbone file"
        )
    return backbone.to(device).eval()


@dataclass
class Exported:
    path: Path
    load_with: str  # one line of Python that builds the model the file loads into


def export_backbone(
    run_dir: Path | str, format: str = "safetensors", out: Path | str | None = None, overwrite: bool = False
) -> Exported:
    """Write the backbone of ``run_dir`` as ``format`` to ``out`` (default: in the run directory).
    An existing file is replaced only with ``overwrite``; nothing is written inside another run
    directory, nor over the run's own files."""
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got '{format}'")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir}: no such run directory"
            if not run_dir.exists()
            else f"{run_dir} {what_is_at(run_dir)}, not a run directory"
        )
    default = run_dir / ("backbone.safetensors" if format == "safetensors" else f"backbone-{format}.pt")
    out = rundir.check_output_file(default if out is None else out, overwrite, "--out", own_run=run_dir)
    backbone, info = _from_run(run_dir)
    if format == "safetensors":
        weights = {k: v.contiguous() for k, v in backbone.state_dict().items()}
        data = _safetensors().torch.save(weights, metadata={METADATA_KEY: json.dumps(info)})
        _write(out, lambda handle: handle.write(data))
        return Exported(out, f"backbone = suncet.load_backbone('{out}')")
    if format not in getattr(backbone, "equivalents", {}):
        raise ConfigError(
            f"backbone '{info['backbone']}' has no {format} equivalent; export it with --format safetensors "
            "and load it with suncet.load_backbone"
        )
    _write(out, lambda handle: torch.save(backbone.equivalent_state_dict(), handle))
    # strict=False: the file has no classifier, which the library's model has.
    return Exported(out, f"{backbone.equivalents[format]}; model.load_state_dict(torch.load('{out}'), strict=False)")


def _write(out: Path, write) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, write)
