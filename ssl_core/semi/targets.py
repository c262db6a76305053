"""Targets and schedules that semi-supervised losses share: sharpening, MixUp, distribution alignment,
training-signal annealing and the ramp-up of the unlabeled weight. Pure functions of tensors and the step."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sharpen(probabilities: Tensor, temperature: float) -> Tensor:
    """MixMatch's ``Sharpen(p, T)_i = p_i^(1/T) / sum_j p_j^(1/T)``. Shape: (batch, classes) -> same."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    powered = probabilities.clamp(min=1e-12).pow(1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


def mixup(inputs_a: Tensor, targets_a: Tensor, inputs_b: Tensor, targets_b: Tensor,
          lam: Tensor) -> tuple[Tensor, Tensor]:
    """MixMatch's MixUp: ``lam' = max(lam, 1 - lam)`` per row, ``x = lam' a + (1 - lam') b``, same for the targets,
    so the mixed row stays closer to ``a``. Shape: inputs (batch, ...), targets (batch, classes), lam (batch,)."""
    lam = torch.maximum(lam, 1.0 - lam)
    lam_inputs = lam.view(-1, *([1] * (inputs_a.ndim - 1))).to(inputs_a.dtype)
    lam_targets = lam.view(-1, 1).to(targets_a.dtype)
    return (lam_inputs * inputs_a + (1.0 - lam_inputs) * inputs_b,
            lam_targets * targets_a + (1.0 - lam_targets) * targets_b)


def distribution_alignment(probabilities: Tensor, labeled_marginal: Tensor, model_marginal: Tensor) -> Tensor:
    """ReMixMatch's alignment: ``q = Normalize(p * p(y) / p~(y))`` with ``p(y)`` the labeled class distribution and
    ``p~(y)`` the running mean of the model's predictions on unlabeled data. Shape: (batch, classes), (classes,)."""
    aligned = probabilities * (labeled_marginal / model_marginal.clamp(min=1e-6)).view(1, -1)
    return aligned / aligned.sum(dim=1, keepdim=True)


def tsa_threshold(step: int, total_steps: int, num_classes: int, schedule: str) -> float:
    """UDA's training-signal annealing: ``eta_t = alpha_t (1 - 1/K) + 1/K`` with ``alpha_t`` = ``t`` (linear),
    ``1 - exp(-5 t)`` (log), ``exp(5 (t - 1))`` (exp) of the progress ``t = step / total_steps``; ``none`` -> 1
    (keep every labeled row). Labeled rows whose correct-class probability exceeds ``eta_t`` are left out."""
    if schedule == "none":
        return 1.0
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if schedule == "linear":
        alpha = progress
    elif schedule == "log":
        alpha = 1.0 - math.exp(-5.0 * progress)
    elif schedule == "exp":
        alpha = math.exp(5.0 * (progress - 1.0))
    else:
        raise ValueError(f"tsa schedule {schedule!r} is unknown; known: none, linear, log, exp")
    return alpha * (1.0 - 1.0 / num_classes) + 1.0 / num_classes


def rampup_weight(step: int, total_steps: int, weight: float, rampup_fraction: float) -> float:
    """``weight * exp(-5 (1 - t)^2)`` with ``t = min(1, step / (rampup_fraction * total_steps))`` (Laine & Aila's
    sigmoid ramp-up); ``weight`` from the start when ``rampup_fraction`` is 0."""
    if rampup_fraction <= 0:
        return weight
    progress = min(1.0, step / max(1.0, rampup_fraction * total_steps))
    return weight * math.exp(-5.0 * (1.0 - progress) ** 2)
