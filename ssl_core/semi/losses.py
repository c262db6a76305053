"""The unlabeled losses of the classic semi-supervised algorithms, as functions of logits (plain PyTorch).

Each returns a scalar averaged over all unlabeled rows of the batch (masked rows count as zero, as in FixMatch's
``1/(mu B) sum 1(max q >= tau) H(q_hat, p_strong)``) together with what the caller logs. Targets are detached.
Shapes: logits (batch, classes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_core.semi.targets import sharpen


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row ``-sum_c targets_c log softmax(logits)_c``. Shape: (batch, classes) x 2 -> (batch,)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)


def confident_pseudo_labels(target_logits: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """``(hard labels argmax softmax, mask max softmax >= threshold as float)`` of detached ``target_logits``."""
    confidence, labels = torch.softmax(target_logits.detach().float(), dim=1).max(dim=1)
    return labels, (confidence >= threshold).float()


def fixmatch_loss(weak_logits: Tensor, strong_logits: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """FixMatch (Sohn et al., 2020): the weak view's argmax as a hard label for the strong view, kept where the weak
    view's confidence is >= ``threshold``: ``mean_b 1(max q_b >= tau) CE(argmax q_b, strong_b)``. Returns (loss,
    mask)."""
    labels, mask = confident_pseudo_labels(weak_logits, threshold)
    return (F.cross_entropy(strong_logits, labels, reduction="none") * mask).mean(), mask


def pseudo_label_loss(logits: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Pseudo-Label (Lee, 2013): the model's own argmax on the same view as a hard target where its confidence is
    >= ``threshold`` (0 keeps every row, the paper's form). Returns (loss, mask)."""
    labels, mask = confident_pseudo_labels(logits, threshold)
    return (F.cross_entropy(logits, labels, reduction="none") * mask).mean(), mask


def entropy_loss(logits: Tensor) -> Tensor:
    """Entropy minimisation (Grandvalet & Bengio, 2005): ``mean_b -sum_c p_bc log p_bc`` with gradients through p."""
    return (-(torch.softmax(logits, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1)).mean()


def consistency_mse(logits: Tensor, target_probabilities: Tensor) -> Tensor:
    """The Pi-model / temporal-ensembling / mean-teacher consistency: ``mean_b sum_c (softmax(logits)_bc -
    target_bc)^2`` against a detached target distribution."""
    return ((torch.softmax(logits, dim=1) - target_probabilities.detach()) ** 2).sum(dim=1).mean()


def uda_loss(weak_logits: Tensor, strong_logits: Tensor, temperature: float,
             threshold: float) -> tuple[Tensor, Tensor]:
    """UDA (Xie et al., 2020): the weak view's prediction sharpened by ``softmax(z / T)`` as a soft target for the
    strong view, kept where the weak view's max probability is >= ``threshold``:
    ``mean_b 1(max p_b >= beta) H(softmax(z_b / T), softmax(strong_b))``. Returns (loss, mask)."""
    weak = weak_logits.detach().float()
    targets = torch.softmax(weak / temperature, dim=1)
    mask = (torch.softmax(weak, dim=1).max(dim=1).values >= threshold).float()
    return (_soft_cross_entropy(strong_logits, targets) * mask).mean(), mask


def tsa_cross_entropy(logits: Tensor, labels: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Labeled cross-entropy under UDA's training-signal annealing: rows whose correct-class probability exceeds
    ``threshold`` are left out; the sum over the kept rows is divided by their count (at least 1). Returns
    (loss, kept mask)."""
    per_row = F.cross_entropy(logits, labels, reduction="none")
    correct = torch.softmax(logits.detach().float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    kept = (correct <= threshold).float()
    return (per_row * kept).sum() / kept.sum().clamp(min=1.0), kept


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_b H(targets_b, softmax(logits_b))`` against detached soft targets (MixMatch's labeled term,
    ReMixMatch's unlabeled terms)."""
    return _soft_cross_entropy(logits, targets.detach()).mean()


def mixmatch_unlabeled_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """MixMatch's unlabeled term: ``1/(L |U'|) sum ||q - softmax(logits)||^2`` (squared L2 divided by the number of
    classes L)."""
    return consistency_mse(logits, targets) / logits.shape[1]


def guessed_labels(probabilities_per_augmentation: Tensor, temperature: float) -> Tensor:
    """MixMatch's label guess: the mean of the K augmentations' predictions, sharpened.
    Shape: (K, batch, classes) -> (batch, classes)."""
    return sharpen(probabilities_per_augmentation.mean(dim=0), temperature)


def certainty_weights(scores: Tensor) -> Tensor:
    """Iscen et al.'s per-row weight of a propagated label: ``1 - H(z_hat) / log(C)`` of the row-normalised
    non-negative scores. Shape: (rows, classes) -> (rows,) in [0, 1]."""
    scores = scores.clamp(min=0.0)
    probabilities = scores / scores.sum(dim=1, keepdim=True).clamp(min=1e-12)
    entropy = -(probabilities * probabilities.clamp(min=1e-12).log()).sum(dim=1)
    return (1.0 - entropy / math.log(scores.shape[1])).clamp(0.0, 1.0)
