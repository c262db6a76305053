"""LARS and schedules for SSL pre-training.

LARS (You et al. 2017, "Large Batch Training of Convolutional Networks") as used by SimCLR and BYOL: per
parameter, ``d = grad + weight_decay * p`` is scaled by the trust ratio
``trust_coefficient * ||p|| / (||grad|| + weight_decay * ||p|| + eps)`` (1 when either norm is zero), then
SGD momentum: ``buf = momentum * buf + d``, ``p -= lr * buf``. Groups with ``lars_exclude=True`` (biases and
norm parameters) skip the weight decay and the trust ratio, i.e. get plain SGD with momentum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling with SGD momentum; see the module docstring for the update."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"lr={lr} must be non-negative")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} is out of range [0, 1)")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay={weight_decay} must be non-negative")
        if trust_coefficient <= 0.0:
            raise ValueError(f"trust_coefficient={trust_coefficient} must be positive")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if not group["lars_exclude"]:
                    weight_decay = group["weight_decay"]
                    if weight_decay != 0.0:
                        update = update.add(param, alpha=weight_decay)
                    param_norm = torch.linalg.vector_norm(param)
                    grad_norm = torch.linalg.vector_norm(param.grad)
                    denominator = grad_norm + weight_decay * param_norm + group["eps"]
                    trust_ratio = torch.where(
                        (param_norm > 0) & (grad_norm > 0),
                        group["trust_coefficient"] * param_norm / denominator,
                        torch.ones_like(param_norm),
                    )
                    update = update * trust_ratio
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into ``[weights (ndim >= 2), decayed; biases and norm params, not decayed]``.

    The second group has ``weight_decay=0`` and ``lars_exclude=True`` (ignored by optimizers other than
    ``LARS``). Parameters with ``requires_grad=False`` (frozen teachers) are left out.
    """
    decayed: list[nn.Parameter] = []
    not_decayed: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decayed if param.ndim >= 2 else not_decayed).append(param)
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": not_decayed, "weight_decay": 0.0, "lars_exclude": True},
    ]


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, base_value: float, final_value: float = 0.0
) -> float:
    """Linear warm-up then cosine decay, a pure function of the step (lr, weight decay, temperatures).

    ``base_value * step / warmup_steps`` for ``step < warmup_steps``; then
    ``final + (base - final) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2``, reaching
    ``final_value`` at ``total_steps`` and staying there beyond it.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} is out of range [0, {total_steps}]")
    if step < 0:
        raise ValueError(f"step={step} must be non-negative")
    if step < warmup_steps:
        return base_value * step / warmup_steps
    if step >= total_steps:
        return final_value
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_value + (base_value - final_value) * (1.0 + math.cos(math.pi * progress)) / 2.0


def build_optimizer(
    param_groups: list[dict[str, Any]], name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """LARS (momentum 0.9), AdamW or SGD (momentum 0.9, Nesterov) over ``param_groups``."""
    if name == "lars":
        return LARS(param_groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r} is not one of lars, adamw, sgd")


def scaled_lr(base_lr: float, global_batch_size: int, scaling: str) -> float:
    """SimCLR's rule: ``base_lr x batch / 256`` (``linear``), ``base_lr x sqrt(batch / 256)`` (``sqrt``), or
    ``base_lr`` (``none``)."""
    if scaling == "linear":
        return base_lr * global_batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch_size / 256)
    return base_lr
