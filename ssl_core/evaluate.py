"""Frozen-feature evaluation: feature extraction, weighted kNN and a linear probe.

- Weighted kNN (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", Sec. 3.4; as used by DINO and solo-learn): features are L2-normalised, each test sample
  takes its ``k`` most cosine-similar training samples, neighbour ``i`` votes for its class with weight
  ``exp(sim_i / temperature)``; the class score is the sum of the votes.
- Linear probe: features standardised with the training statistics, then a multinomial logistic
  regression (``nn.Linear`` + cross-entropy) trained with AdamW and a cosine learning-rate decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Encode ``images`` in eval mode without gradients; the encoder's train/eval mode is restored after.

    ``images`` is a tensor split into batches of ``batch_size``, or an iterable of batches. uint8 images are
    scaled to [0, 1] floats; ``normalize`` (e.g. mean/std normalisation) is then applied on ``device``
    (default: the encoder's device). Features are returned on the CPU as float32.

    Shape: images (N, C, H, W) -> features (N, D).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if device is None:
        first_param = next(encoder.parameters(), None)
        device = first_param.device if first_param is not None else torch.device("cpu")
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    was_training = encoder.training
    encoder.eval()
    features: list[torch.Tensor] = []
    try:
        for batch in batches:
            if batch.ndim != 4:
                raise ValueError(f"images must have shape (N, C, H, W), got a batch of shape {tuple(batch.shape)}")
            batch = batch.to(device, non_blocking=True)
            batch = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
            if normalize is not None:
                batch = normalize(batch)
            features.append(encoder(batch).float().cpu())
    finally:
        encoder.train(was_training)
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features)


def _check_features(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D, got train {tuple(train_features.shape)} and test {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature dims differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must have shape ({train_features.shape[0]},), got {tuple(train_labels.shape)}")


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Weighted-kNN class scores: ``score[j, c] = sum_{i in topk(j), y_i = c} exp(cos(x_j, x_i) / temperature)``.

    Computed on ``train_features``' device, ``batch_size`` test samples at a time (memory
    ``batch_size * N_train``). ``k`` is capped at ``N_train``.

    Shape: train_features (N_train, D), train_labels (N_train,) int, test_features (N_test, D)
    -> scores (N_test, num_classes).
    """
    _check_features(train_features, train_labels, test_features)
    if k <= 0:
        raise ValueError(f"k={k} must be positive")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    device = train_features.device
    train_labels = train_labels.to(device=device, dtype=torch.long)
    if train_labels.numel() and (train_labels.min() < 0 or train_labels.max() >= num_classes):
        raise ValueError(f"train_labels must lie in [0, {num_classes - 1}]")
    train_normed = F.normalize(train_features.float(), dim=1)
    k = min(k, train_features.shape[0])
    scores = []
    for chunk in test_features.split(batch_size):
        chunk = F.normalize(chunk.to(device).float(), dim=1)
        similarity, indices = (chunk @ train_normed.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        chunk_scores = torch.zeros(chunk.shape[0], num_classes, device=device)
        chunk_scores.scatter_add_(1, train_labels[indices], weights)
        scores.append(chunk_scores)
    return torch.cat(scores)


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels.to(scores.device).view(-1, 1)).any(dim=1).float().mean().item()


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of ``knn_predict`` on ``test_labels`` (top-5 is capped at ``num_classes``).

    Returns ``{"top1": float, "top5": float}`` in [0, 1].
    """
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels must have shape ({test_features.shape[0]},), got {tuple(test_labels.shape)}")
    scores = knn_predict(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        batch_size=batch_size,
    )
    return {"top1": _topk_accuracy(scores, test_labels, 1), "top5": _topk_accuracy(scores, test_labels, 5)}


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int | None = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Test top-1 accuracy of a logistic regression on frozen features.

    Features are standardised with the training mean and std; ``nn.Linear(D, num_classes)`` starts from zero
    (the problem is convex) and is trained with AdamW on cross-entropy for ``epochs`` passes, in shuffled
    minibatches of ``batch_size`` (``None``: full batch), with a cosine learning-rate decay to 0. The result
    depends only on the inputs and ``seed`` (which drives the shuffling).

    Shape: train_features (N_train, D), train_labels (N_train,), test_features (N_test, D),
    test_labels (N_test,). Returns ``{"top1": float}`` in [0, 1].
    """
    _check_features(train_features, train_labels, test_features)
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels must have shape ({test_features.shape[0]},), got {tuple(test_labels.shape)}")
    if epochs <= 0:
        raise ValueError(f"epochs={epochs} must be positive")
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive or None")
    device = torch.device(device) if device is not None else train_features.device
    train_x = train_features.to(device).float()
    test_x = test_features.to(device).float()
    train_y = train_labels.to(device=device, dtype=torch.long)
    test_y = test_labels.to(device=device, dtype=torch.long)
    if train_y.min() < 0 or train_y.max() >= num_classes:
        raise ValueError(f"train_labels must lie in [0, {num_classes - 1}]")

    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, unbiased=False).clamp_min(1e-6)
    train_x = (train_x - mean) / std
    test_x = (test_x - mean) / std

    classifier = nn.Linear(train_x.shape[1], num_classes).to(device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    num_train = train_x.shape[0]
    step_size = num_train if batch_size is None else min(batch_size, num_train)
    steps_per_epoch = math.ceil(num_train / step_size)
    total_steps = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)

    step = 0
    for _ in range(epochs):
        order = torch.randperm(num_train, generator=generator).to(device)
        for batch_indices in order.split(step_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            loss = F.cross_entropy(classifier(train_x[batch_indices]), train_y[batch_indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

    with torch.no_grad():
        predictions = classifier(test_x).argmax(dim=1)
    return {"top1": (predictions == test_y).float().mean().item()}
