"""Momentum (EMA) teachers: BYOL / MoCo / DINO target networks.

The teacher's parameters follow the student's by an exponential moving average,
``teacher = momentum * teacher + (1 - momentum) * student``, with ``momentum`` typically raised from
``base_momentum`` towards 1 on a cosine schedule (BYOL, Grill et al. 2020, Sec. 3.2).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base_momentum: float, final_momentum: float = 1.0) -> float:
    """BYOL's EMA momentum schedule, a pure function of the step.

    ``m(step) = final - (final - base) * (cos(pi * step / total_steps) + 1) / 2``: ``base`` at step 0,
    ``final`` at ``total_steps``; steps past ``total_steps`` are clamped to ``final``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    if step < 0:
        raise ValueError(f"step={step} must be non-negative")
    if not 0.0 <= base_momentum <= 1.0:
        raise ValueError(f"base_momentum={base_momentum} is out of range [0, 1]")
    if not 0.0 <= final_momentum <= 1.0:
        raise ValueError(f"final_momentum={final_momentum} is out of range [0, 1]")
    progress = min(step, total_steps) / total_steps
    return final_momentum - (final_momentum - base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0


def _matching_parameters(student: nn.Module, teacher: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    student_params = dict(student.named_parameters())
    teacher_params = dict(teacher.named_parameters())
    if student_params.keys() != teacher_params.keys():
        only_student = sorted(student_params.keys() - teacher_params.keys())
        only_teacher = sorted(teacher_params.keys() - student_params.keys())
        raise ValueError(
            f"student and teacher parameters differ: only in student {only_student}, only in teacher {only_teacher}"
        )
    for name, param in student_params.items():
        if param.shape != teacher_params[name].shape:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(param.shape)} in student "
                f"but {tuple(teacher_params[name].shape)} in teacher"
            )
    names = list(student_params)
    return [student_params[n] for n in names], [teacher_params[n] for n in names]


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """Move ``teacher`` towards ``student`` in place: ``t = momentum * t + (1 - momentum) * s``.

    Parameters are matched by name (a name or shape mismatch raises ``ValueError``); buffers such as
    BatchNorm running statistics are copied from the student, as in BYOL and MoCo's reference code.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum={momentum} is out of range [0, 1]")
    student_params, teacher_params = _matching_parameters(student, teacher)
    if teacher_params:
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
    teacher_buffers = dict(teacher.named_buffers())
    for name, buffer in student.named_buffers():
        if name not in teacher_buffers:
            raise ValueError(f"buffer {name!r} of the student is missing in the teacher")
        teacher_buffers[name].copy_(buffer)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters have ``requires_grad=False`` (a teacher's initial state)."""
    teacher = copy.deepcopy(module)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher
