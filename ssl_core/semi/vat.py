"""Virtual adversarial training (Miyato et al., 2018): the perturbation direction that most changes the model's
prediction, found by power iteration with finite differences, and the consistency under it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _unit(vectors: Tensor) -> Tensor:
    """Each row (all dimensions but the first) scaled to unit L2 norm."""
    norms = vectors.flatten(1).norm(dim=1).clamp(min=1e-12)
    return vectors / norms.view(-1, *([1] * (vectors.ndim - 1)))


def kl_from_logits(target_logits: Tensor, logits: Tensor) -> Tensor:
    """``mean_b KL(softmax(target_b) || softmax(logits_b))``; the target is detached."""
    target = F.log_softmax(target_logits.detach().float(), dim=1)
    return (target.exp() * (target - F.log_softmax(logits.float(), dim=1))).sum(dim=1).mean()


def adversarial_direction(model: Callable[[Tensor], Tensor], inputs: Tensor, clean_logits: Tensor, xi: float,
                          power_iterations: int, generator: torch.Generator | None = None) -> Tensor:
    """Unit direction ``d`` (per row) approximating the dominant eigenvector of the Hessian of
    ``KL(p(x) || p(x + r))`` at ``r = 0``: start from a random unit ``d``, then ``power_iterations`` times
    ``d <- unit(grad_r KL(p(x) || p(x + r)) at r = xi d)``. Gradients reach ``d`` only (not the model's parameters).
    Shape: inputs (batch, ...) -> same."""
    noise = torch.randn(inputs.shape, generator=generator, device=generator.device if generator else inputs.device)
    direction = _unit(noise.to(inputs.device, inputs.dtype))
    for _ in range(power_iterations):
        direction = direction.detach().requires_grad_(True)
        divergence = kl_from_logits(clean_logits, model(inputs + xi * direction))
        (gradient,) = torch.autograd.grad(divergence, direction)
        direction = _unit(gradient)
    return direction.detach()
