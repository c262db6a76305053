"""DINO (Caron et al. 2021): self-distillation of a momentum teacher's centred, sharpened output across crops.

The student sees every crop (2 global + ``num_local_crops`` local), the teacher the 2 global ones. The teacher
temperature warms up linearly from ``warmup_teacher_temperature`` to ``teacher_temperature`` over the first
``teacher_temperature_warmup_fraction`` of training, a pure function of the step.

On a ViT (``backbone: vit_tiny`` / ``vit_small``) the feature is the CLS token; the local crops (smaller than
``image_size``) go through the same ViT with its position embeddings interpolated to their patch grid. With
``gather_distributed`` (default) the teacher center follows the batch mean over every rank (all-reduced).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.ema import frozen_copy
from ssl_core.heads import DINOHead
from ssl_core.hparams import FieldValueError, bounded
from ssl_core.losses import DINOLoss
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.views import ViewGenerator, dino_views


@dataclass(frozen=True)
class DINOConfig(MethodConfig):
    out_dim: int = bounded(65536, 16, 262144)
    hidden_dim: int = bounded(2048, 16, 16384)
    bottleneck_dim: int = bounded(256, 8, 4096)
    norm_last_layer: bool = True
    student_temperature: float = bounded(0.1, 0.01, 1.0)
    teacher_temperature: float = bounded(0.04, 0.01, 1.0)
    warmup_teacher_temperature: float = bounded(0.04, 0.01, 1.0)
    teacher_temperature_warmup_fraction: float = bounded(0.0, 0.0, 1.0)
    center_momentum: float = bounded(0.9, 0.0, 1.0)
    momentum: float = bounded(0.996, 0.0, 1.0)
    num_local_crops: int = bounded(6, 0, 16)
    gather_distributed: bool = True
    encoder_depth: int = bounded(12, 1, 48)
    """Transformer blocks of a ViT encoder (``vit_tiny`` / ``vit_small``); a ResNet takes only the default."""

    def check(self) -> None:
        super().check()
        if not self.backbone.startswith("vit_") and self.encoder_depth != 12:
            raise FieldValueError("encoder_depth", self.encoder_depth, f"applies to a ViT, not {self.backbone!r}",
                                  f"{type(self).__name__}.encoder_depth")


def teacher_temperature_at(step: int, total_steps: int, config: DINOConfig) -> float:
    """Linear warmup from ``warmup_teacher_temperature`` to ``teacher_temperature``, then constant."""
    warmup_steps = config.teacher_temperature_warmup_fraction * total_steps
    if step >= warmup_steps:
        return config.teacher_temperature
    fraction = step / warmup_steps
    return config.warmup_teacher_temperature + fraction * (config.teacher_temperature - config.warmup_teacher_temperature)


class SelfDistillation(SSLMethod):
    """What DINO and DINOv2 share: the multi-crop views (2 global + ``num_local_crops`` local) and the teacher
    temperature ``teacher_temperature_now``, set after each optimizer step by ``teacher_temperature_at`` and carried
    across checkpoints as extra state. The subclass sets ``teacher_temperature_now`` in ``__init__``."""

    teacher_temperature_now: float

    def get_extra_state(self) -> dict[str, float]:
        return {"teacher_temperature_now": self.teacher_temperature_now}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.teacher_temperature_now = float(state["teacher_temperature_now"])

    def view_generator(self) -> ViewGenerator:
        return dino_views(self.config.image_size, self.config.num_local_crops)

    @torch.no_grad()
    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        super().on_after_optimizer_step(step, total_steps)
        self.teacher_temperature_now = teacher_temperature_at(step + 1, total_steps, self.config)


@register_method("dino")
class DINO(SelfDistillation):
    Config = DINOConfig

    def __init__(self, config: DINOConfig) -> None:
        super().__init__(config)
        is_vit = config.backbone.startswith("vit_")
        self.encoder = self.build_encoder(depth=config.encoder_depth) if is_vit else self.build_encoder()
        self.head = DINOHead(
            self.encoder.feature_dim,
            config.out_dim,
            hidden_dim=config.hidden_dim,
            bottleneck_dim=config.bottleneck_dim,
            norm_last_layer=config.norm_last_layer,
        )
        self.teacher_encoder = frozen_copy(self.encoder)
        self.teacher_head = frozen_copy(self.head)
        self.criterion = DINOLoss(
            config.out_dim,
            student_temperature=config.student_temperature,
            teacher_temperature=config.teacher_temperature,
            center_momentum=config.center_momentum,
            gather_distributed=config.gather_distributed,
        )
        self.teacher_temperature_now = teacher_temperature_at(0, 1, config)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.teacher_encoder), (self.head, self.teacher_head)]

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        global_views = [views[k] for k in sorted(views) if k.startswith("global_")]
        local_views = [views[k] for k in sorted(views) if k.startswith("local_")]
        batch = global_views[0].shape[0]
        student = [self.head(self.encoder(torch.cat(global_views))).float()]
        if local_views:
            student.append(self.head(self.encoder(torch.cat(local_views))).float())
        student_out = list(torch.cat(student).split(batch))
        with torch.no_grad():
            teacher_out = list(self.teacher_head(self.teacher_encoder(torch.cat(global_views))).float().split(batch))
        loss = self.criterion(student_out, teacher_out, teacher_temperature=self.teacher_temperature_now)
        return StepOutput(loss, {"teacher_temperature": torch.tensor(self.teacher_temperature_now)})
