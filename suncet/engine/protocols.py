"""Semi-supervised evaluation of a backbone: kNN, linear probe and fine-tuning on the labeled subset."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suncet.data.augment import BatchAugment, eval_transform
from suncet.data import ImageDataset, ImageSource


@dataclass
class Scores:
    top1: float
    top5: float | None

    def as_dict(self) -> dict[str, float]:
        out = {"top1": self.top1}
        if self.top5 is not None:
            out["top5"] = self.top5
        return out


def topk_scores(logits: Tensor, targets: Tensor, num_classes: int) -> Scores:
    top1 = (logits.argmax(dim=1) == targets).float().mean().item()
    top5 = None
    if num_classes > 5:
        top5 = (logits.topk(5, dim=1).indices == targets[:, None]).any(dim=1).float().mean().item()
    return Scores(top1, top5)


@torch.no_grad()
def extract_features(
    backbone: nn.Module, source: ImageSource, dataset: ImageDataset, device: torch.device, batch_size: int = 512,
    indices: Tensor | None = None,
) -> Tensor:
    """Backbone features (fp32, on ``device``) of the deterministic view of each image."""
    was_training = backbone.training
    backbone.eval()
    order = torch.arange(len(source)) if indices is None else indices.cpu()
    chunks = []
    for start in range(0, len(order), batch_size):
        images = source.load(order[start : start + batch_size]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            chunks.append(backbone(eval_transform(images, dataset.recipe)).float())
    backbone.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, getattr(backbone, "feature_dim", 0), device=device)


def knn_classify(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
    num_classes: int, k: int = 20, temperature: float = 0.07,
) -> Scores:
    """Cosine kNN with exp(sim / T) weighted votes (the usual self-supervised monitor)."""
    train = F.normalize(train_features, dim=1)
    test = F.normalize(test_features, dim=1)
    k = min(k, train.shape[0])
    votes = []
    for start in range(0, test.shape[0], 1024):
        sims = test[start : start + 1024] @ train.T
        top, idx = sims.topk(k, dim=1)
        weights = torch.exp(top / temperature)
        one_hot = F.one_hot(train_labels.to(idx.device)[idx], num_classes).float()
        votes.append((weights[..., None] * one_hot).sum(dim=1))
    return topk_scores(torch.cat(votes), test_labels.to(train.device), num_classes)


def linear_probe(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
    num_classes: int, weight_decay: float = 1e-3, max_iter: int = 300,
) -> Scores:
    """Multinomial logistic regression on frozen features, fit by L-BFGS (deterministic).

    Features are L2-normalised and standardised with the training features' statistics.
    """
    device = train_features.device
    x_train = F.normalize(train_features.double(), dim=1)
    x_test = F.normalize(test_features.double().to(device), dim=1)
    mean, std = x_train.mean(dim=0), x_train.std(dim=0, unbiased=False).clamp(min=1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y = train_labels.to(device)
    weight = torch.zeros(x_train.shape[1], num_classes, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return topk_scores(x_test @ weight + bias, test_labels.to(device), num_classes)


def raw_pixel_baseline(dataset: ImageDataset, labeled: Tensor, device: torch.device) -> Scores:
    """The same linear probe on raw pixels: what the labels give without any pre-training."""
    train_x = dataset.train.load(labeled).flatten(1).float().to(device) / 255
    test_x = dataset.test.load(torch.arange(len(dataset.test))).flatten(1).float().to(device) / 255
    return linear_probe(train_x, dataset.train.labels[labeled], test_x, dataset.test.labels, dataset.num_classes)


def finetune(
    backbone: nn.Module, dataset: ImageDataset, labeled: Tensor, device: torch.device, *,
    epochs: int, batch_size: int = 256, lr: float = 0.05, weight_decay: float = 5e-4, seed: int = 0,
) -> Scores:
    """The paper's protocol: drop the head, add a zero-initialised linear layer, fine-tune the
    whole network on the labeled subset only (augmented with the dataset's crops), then test."""
    torch.manual_seed(seed)
    model = nn.Sequential(copy.deepcopy(backbone), nn.Linear(backbone.feature_dim, dataset.num_classes)).to(device)
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    augment = BatchAugment(dataset.recipe, dataset.recipe.global_crop)
    generator = torch.Generator().manual_seed(seed)  # views are drawn on the host, as in training
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    labels = dataset.train.labels[labeled].to(device)
    batch_size = min(batch_size, len(labeled))
    steps_per_epoch = max(1, math.ceil(len(labeled) / batch_size))
    total = epochs * steps_per_epoch
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(labeled), generator=torch.Generator().manual_seed(seed + step))
        for start in range(0, len(labeled), batch_size):
            pick = order[start : start + batch_size]
            images = augment(dataset.train.load(labeled[pick]).to(device), generator)
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(images).float(), labels[pick.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    test_features = extract_features(model[0], dataset.test, dataset, device)
    with torch.no_grad():
        logits = model[1](test_features)
    return topk_scores(logits, dataset.test.labels.to(device), dataset.num_classes)
