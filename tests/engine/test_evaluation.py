"""The classifier fit the linear probe and fine-tuning share (the regularised logistic regression
it states, at its optimum) and the fine-tuning protocol (method.md section 7): epochs from the labeled share, SimCLR's optimizer and
learning-rate rule, crop-and-flip augmentation only, a short run that learns, and the classifier
it starts from."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from suncet.data.augment import BatchAugment, normalize
from suncet.data.recipe import ViewColumn
from suncet.engine.protocols import (
    extract_features,
    finetune,
    finetune_epochs,
    finetune_optimizer,
    finetune_recipe,
    finetune_settings,
    fit_classifier,
)
from suncet.errors import NonFiniteError
from suncet.plugins.datasets import imagefolder
from suncet.registry import BACKBONES, DATASETS

IMAGENET_TRAIN = 1_281_167
SIMCLR_10PCT = 128_116  # lines in SimCLR's 10% list: 0.0999995 of the training images
SIMCLR_1PCT = 12_811


def test_epochs_follow_the_labeled_share_with_a_margin():
    assert SIMCLR_10PCT / IMAGENET_TRAIN < 0.1
    assert finetune_epochs(SIMCLR_10PCT, IMAGENET_TRAIN) == 30
    assert finetune_epochs(SIMCLR_1PCT, IMAGENET_TRAIN) == 60
    assert finetune_epochs(144, 1437) == 30 and finetune_epochs(14, 1437) == 60  # digits, 10% and 1%
    assert finetune_epochs(20, 1000) == 60 and finetune_epochs(21, 1000) == 30  # the line: 2%
    with pytest.raises(ValueError, match="labeled images"):
        finetune_epochs(0, 1000)


def test_paper_settings_for_the_10pct_and_1pct_lists():
    ten = finetune_settings(SIMCLR_10PCT, IMAGENET_TRAIN, batch_size=4096)
    assert (ten.epochs, ten.batch_size, ten.momentum, ten.nesterov, ten.weight_decay) == (30, 4096, 0.9, True, 0.0)
    assert ten.lr == pytest.approx(0.8)  # SimCLR's 0.05 x 4096 / 256
    one = finetune_settings(SIMCLR_1PCT, IMAGENET_TRAIN)
    assert (one.epochs, one.batch_size, one.lr) == (60, 256, pytest.approx(0.05))
    small = finetune_settings(14, 1437)  # fewer labeled images than a batch: one batch of them
    assert (small.epochs, small.batch_size, small.lr) == (60, 14, pytest.approx(0.05 * 14 / 256))
    custom = finetune_settings(
        SIMCLR_1PCT,
        IMAGENET_TRAIN,
        epochs=5,
        batch_size=512,
        base_lr=0.1,
        momentum=0.8,
        nesterov=False,
        weight_decay=1e-4,
    )
    assert (custom.epochs, custom.lr, custom.momentum, custom.nesterov, custom.weight_decay) == (
        5,
        0.2,
        0.8,
        False,
        1e-4,
    )


def test_optimizer_is_nesterov_sgd_without_weight_decay():
    settings = finetune_settings(SIMCLR_10PCT, IMAGENET_TRAIN, batch_size=1024)
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = finetune_optimizer(nn.ParameterList([weight]), settings)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["nesterov"], group["momentum"], group["weight_decay"]) == (True, 0.9, 0.0)
    assert group["lr"] == pytest.approx(0.2)
    # Two steps against Nesterov's update written out: v = mu v + g, w -= lr (g + mu v).
    grads = [torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 0.25])]
    expected, velocity = torch.tensor([1.0, -2.0]), torch.zeros(2)
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
        velocity = 0.9 * velocity + grad
        expected = expected - 0.2 * (grad + 0.9 * velocity)
    assert torch.allclose(weight.detach(), expected, atol=1e-7)


def crop_and_flip_error(augment: BatchAugment) -> float:
    """Largest difference between ``augment``'s views and torchvision's resized crop of each
    view's box, mirrored where flipped, normalised: 0 when the views are crop and flip only."""
    images = torch.randint(0, 256, (16, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = augment.sample(16, 40, 56, 3, torch.Generator().manual_seed(1))
    views = augment(images, torch.Generator().manual_seed(1))
    assert 0 < (params[:, ViewColumn.FLIP] > 0.5).sum() < 16
    error = 0.0
    for image, row, view in zip(images, params, views):
        top, left, h, w = row[ViewColumn.TOP : ViewColumn.WIDTH + 1].long().tolist()
        expected = TF.resized_crop(image.float() / 255, top, left, h, w, [224, 224], antialias=True)
        if row[ViewColumn.FLIP] > 0.5:
            expected = TF.horizontal_flip(expected)
        expected = normalize(expected[None], augment.recipe.mean, augment.recipe.std)[0]
        error = max(error, (view - expected).abs().max().item())
    return error


def test_finetune_views_are_crop_and_flip_only():
    recipe = finetune_recipe(imagefolder.RECIPE)
    assert recipe.global_crop == imagefolder.RECIPE.global_crop and recipe.flip_p == 0.5
    assert crop_and_flip_error(BatchAugment(recipe, recipe.global_crop, triton_kernels=False)) < 1e-4
    # The pre-training recipe's colour steps do show.
    pretraining = BatchAugment(imagefolder.RECIPE, imagefolder.RECIPE.global_crop, triton_kernels=False)
    assert crop_and_flip_error(pretraining) > 0.1


def test_short_finetune_on_digits_beats_chance():
    dataset = DATASETS.create("digits", root=None, download=False, options={})
    torch.manual_seed(0)
    backbone = BACKBONES.create("small_resnet", in_channels=1, image_size=8, width=16)
    labeled = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(0))[:144]  # 10%
    scores = finetune(backbone, dataset, labeled, torch.device("cpu"), batch_size=64)  # 30 epochs, 2 steps each
    assert scores.top1 > 0.3  # 10 classes: chance is 0.1


def test_fit_classifier_is_at_the_optimum_of_its_stated_objective():
    """Cross-entropy of a linear layer plus weight_decay/2 |W|^2: the gradient, written out in
    float64, vanishes at the fitted weights."""
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(60, 12, generator=generator) + 3.0  # post-ReLU-like: a large common mean
    labels = torch.arange(60) % 4
    classifier = fit_classifier(features, labels, 4, weight_decay=1e-2)
    x = features.double()
    weight, bias = classifier.weight, classifier.bias
    residual = torch.softmax(x @ weight.T + bias, dim=1) - torch.nn.functional.one_hot(labels, 4).double()
    grad_weight = residual.T @ x / len(x) + 1e-2 * weight
    grad_bias = residual.mean(0)
    assert grad_weight.abs().max() < 1e-5 and grad_bias.abs().max() < 1e-5  # L-BFGS stops near 1e-6


class PixelBackbone(nn.Module):
    """The digits pixels, each scaled by a trainable factor: no batch norm, so fine-tuning at a zero
    learning rate leaves it and its features exactly as they were."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(64))

    def forward(self, images):
        return images.flatten(1) * self.scale


def test_finetune_starts_from_the_fitted_classifier_and_keeps_it_on_a_small_subset():
    dataset = DATASETS.create("digits", root=None, download=False, options={})
    labeled = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(0))[:14]  # 1%: 60 steps
    backbone, cpu = PixelBackbone(), torch.device("cpu")
    features = extract_features(backbone, dataset.train, dataset, cpu, indices=labeled)
    classifier = fit_classifier(features, dataset.train.labels[labeled], dataset.num_classes)
    test_features = extract_features(backbone, dataset.test, dataset, cpu).double()
    fitted = (classifier(test_features).argmax(1) == dataset.test.labels).double().mean().item()
    assert finetune(backbone, dataset, labeled, cpu, base_lr=0.0).top1 == pytest.approx(fitted, abs=1 / 360)
    from_fit = finetune(backbone, dataset, labeled, cpu).top1
    from_zero = finetune(backbone, dataset, labeled, cpu, head="zero").top1
    # The paper's zero-initialised layer gets 60 steps at lr 0.05 x 14/256 on these 14 images: too
    # few to fit it; started from the fitted classifier, fine-tuning keeps its accuracy.
    assert from_fit >= fitted - 0.03 and from_zero < from_fit - 0.1
    with pytest.raises(ValueError, match="head must be one of probe, zero"):
        finetune(backbone, dataset, labeled, cpu, head="random")


def test_finetune_that_diverges_is_an_error_not_an_accuracy():
    dataset = DATASETS.create("digits", root=None, download=False, options={})
    labeled = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(0))[:14]
    with pytest.raises(NonFiniteError, match="fine-tuning diverged"):
        finetune(PixelBackbone(), dataset, labeled, torch.device("cpu"), base_lr=1e30, epochs=2)
