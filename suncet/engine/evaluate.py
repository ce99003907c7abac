"""Evaluating what a run trained: the protocols applied to a run, and a trained run loaded back
(its backbone alone: engine/export.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from suncet.config import TrainConfig
from suncet.data import InMemoryImages
from suncet.engine import rundir
from suncet.engine.assemble import assemble
from suncet.engine.protocols import (
    extract_features,
    finetune,
    knn_classify,
    linear_probe,
    raw_pixel_baseline,
    snn_classify,
)
from suncet.engine.run import Run
from suncet.engine.state import load_checkpoint
from suncet.errors import ConfigError, NonFiniteError
from suncet.registry import METHODS, plugin_code

PROTOCOLS = ("linear", "knn", "snn", "finetune")


def evaluate_run(
    run: Run,
    protocol: str,
    labeled: Tensor | None = None,
    finetune_epochs: int | None = None,
    finetune_head: str = "probe",
    baseline: bool = False,
) -> dict:
    """Semi-supervised test accuracy with the labeled subset (an empty subset is an error: no
    protocol may fall back on labels the run was not given), of the network the method names
    for evaluation (``Method.evaluated_backbone``: its backbone, or a teacher-student method's teacher).

    'knn', 'snn' (PAWS's soft nearest neighbour: every labeled image votes, weighted by a softmax
    of cosine similarity / 0.1) and 'linear' use frozen backbone features; 'finetune' is the paper's protocol: the whole
    backbone plus a linear classifier trained on the labeled images (60 epochs when they are at
    most 2% of the training set, else 30; method.md section 7), the classifier starting from the
    one fitted to the frozen features (``finetune_head`` 'probe') or, as in the paper, from zero ('zero'). With ``baseline``,
    small in-memory datasets also get the raw-pixel baseline.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got '{protocol}'")
    with plugin_code(METHODS.get(run.config.method), "evaluated_backbone"):
        backbone = run.method.evaluated_backbone()
    dataset, device = run.dataset, run.device
    bank = run.labeled if labeled is None else labeled
    if len(bank) == 0:
        raise ConfigError(
            "evaluation needs labeled images and this label subset has none (--labels 0%); "
            "evaluate with some: suncet eval RUN --labels 10%"
        )
    if protocol == "finetune":
        scores = finetune(
            backbone, dataset, bank, device, epochs=finetune_epochs, seed=run.config.seed, head=finetune_head
        )
    else:
        train_features = extract_features(backbone, dataset.train, dataset, device, indices=bank)
        test_features = extract_features(backbone, dataset.test, dataset, device)
        train_labels = dataset.train.labels[bank].to(device)
        if protocol == "knn":
            scores = knn_classify(
                train_features,
                train_labels,
                test_features,
                dataset.test.labels,
                dataset.num_classes,
                k=run.config.knn_k,
            )
        elif protocol == "snn":
            scores = snn_classify(train_features, train_labels, test_features, dataset.test.labels, dataset.num_classes)
        else:
            scores = linear_probe(train_features, train_labels, test_features, dataset.test.labels, dataset.num_classes)
    covered = int(torch.unique(dataset.train.labels[bank]).numel())
    result = {
        "protocol": protocol,
        "labeled_images": len(bank),
        "labeled_classes": covered,
        **_covered(scores.as_dict(), covered),
    }
    if baseline and isinstance(dataset.train, InMemoryImages) and dataset.image_size <= 32:
        result["raw_pixels"] = _covered(raw_pixel_baseline(dataset, bank, device).as_dict(), covered)
    return result


def _covered(scores: dict, classes: int) -> dict:
    """Top-5 means something only when the labels cover more than 5 classes: else the classes
    never labeled tie at a zero score, and which of them fill the five is arbitrary."""
    return scores if classes > 5 else {k: v for k, v in scores.items() if k != "top5"}


def _with_device(config: TrainConfig, device: str | None) -> TrainConfig:
    return config if device is None else dataclasses.replace(config, device=device)


def load_trained(run_dir: Path | str, device: str | None = None) -> Run:
    """A finished or interrupted run, rebuilt from its directory with its last checkpoint's weights
    (which must be finite, and match the run's config.yaml tensor for tensor)."""
    run_dir = Path(run_dir)
    config = _with_device(rundir.load_run_config(run_dir), device)
    checkpoint = run_dir / rundir.LAST_CHECKPOINT
    state = load_checkpoint(checkpoint)
    check_finite(state["model"], checkpoint)
    run = assemble(config, run_dir, labeled=state["labeled"], checkpoint=state, checkpoint_path=checkpoint)
    run.method.load_state_dict(state["model"])
    run.method.eval()
    return run


def check_finite(weights: dict[str, Tensor], source: Path) -> None:
    """Refuse weights holding NaN or inf: any accuracy measured on them would be meaningless."""
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise NonFiniteError(
            f"the weights in {source} are not finite ({bad}); the training diverged, there is nothing to evaluate"
        )


def final_evaluation(run_dir: Path, config: TrainConfig) -> dict | None:
    """The evaluation a run asks for after training (``final_eval``), written to eval_<protocol>.json."""
    if config.final_eval == "none" or len(rundir.read_labels(run_dir)) == 0:
        return None
    result = evaluate_run(load_trained(run_dir), config.final_eval, baseline=True)
    rundir.write_json(run_dir / f"eval_{config.final_eval}.json", result)
    return result
