"""DINOv2-style training (Oquab et al. 2023) on a ViT: DINO's image-level loss, iBOT's masked-token loss, KoLeo.

- image level (DINO): the student sees every crop (2 global + ``num_local_crops`` local, the latter through
  the ViT with interpolated position embeddings), the EMA teacher the 2 global ones; the CLS token goes through a
  ``DINOHead`` and ``DINOLoss`` compares them across crops;
- patch level (iBOT): in each global crop the student sees a random ``mask_ratio_min``-``mask_ratio_max`` of its
  patches replaced by a learned mask token (at least one per image), the teacher the full crop; a separate
  patch ``DINOHead`` maps patch tokens to ``patch_out_dim`` prototypes and ``IBOTPatchLoss`` makes the student's
  masked patches match the teacher's;
- KoLeo on the student's CLS tokens of each global crop spreads the features (``KoLeoLoss``, summed over crops).

``loss = dino + ibot_loss_weight * ibot + koleo_loss_weight * koleo``. ``centering: sinkhorn`` replaces the
teacher's centring (both losses) by Sinkhorn-Knopp normalisation, as DINOv2 does. The teacher temperature and
EMA momentum follow DINO's schedules. Every global-crop image is masked (DINOv2 masks half of them) and the
masking is per patch (DINOv2 masks blocks). The encoder's feature is the CLS token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.augment import host_to_device
from ssl_core.ema import frozen_copy
from ssl_core.heads import DINOHead
from ssl_core.hparams import FieldValueError, bounded
from ssl_core.losses import CENTERINGS, DINOLoss, IBOTPatchLoss, KoLeoLoss
from ssl_core.methods.base import MethodConfig, StepOutput, register_method
from ssl_core.methods.dino import SelfDistillation, teacher_temperature_at


@dataclass(frozen=True)
class DINOv2Config(MethodConfig):
    backbone: str = "vit_tiny"
    small_images: bool = False
    encoder_depth: int = bounded(12, 1, 48)
    """Transformer blocks of the ViT encoder (12 in ViT-Tiny/Small; fewer for small CPU runs)."""
    out_dim: int = bounded(65536, 16, 262144)
    patch_out_dim: int = bounded(65536, 16, 262144)
    hidden_dim: int = bounded(2048, 16, 16384)
    bottleneck_dim: int = bounded(256, 8, 4096)
    student_temperature: float = bounded(0.1, 0.01, 1.0)
    teacher_temperature: float = bounded(0.07, 0.01, 1.0)
    warmup_teacher_temperature: float = bounded(0.04, 0.01, 1.0)
    teacher_temperature_warmup_fraction: float = bounded(0.3, 0.0, 1.0)
    center_momentum: float = bounded(0.9, 0.0, 1.0)
    centering: str = bounded("center", choices=CENTERINGS)
    momentum: float = bounded(0.992, 0.0, 1.0)
    num_local_crops: int = bounded(8, 0, 16)
    mask_ratio_min: float = bounded(0.1, 0.0, 0.95)
    mask_ratio_max: float = bounded(0.5, 0.0, 0.95)
    ibot_loss_weight: float = bounded(1.0, 0.0, 10.0)
    koleo_loss_weight: float = bounded(0.1, 0.0, 10.0)
    gather_distributed: bool = True

    def check(self) -> None:
        super().check()
        where = type(self).__name__
        if not self.backbone.startswith("vit_"):
            raise FieldValueError("backbone", self.backbone, "must be a ViT (vit_tiny, vit_small)", f"{where}.backbone")
        if self.mask_ratio_min > self.mask_ratio_max:
            raise FieldValueError("mask_ratio_min", self.mask_ratio_min,
                                  f"must be <= mask_ratio_max={self.mask_ratio_max}", f"{where}.mask_ratio_min")


def random_patch_mask(batch: int, num_patches: int, ratio_min: float, ratio_max: float,
                      device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """Per image a ratio ``r`` uniform in [ratio_min, ratio_max] and ``clamp(round(r * num_patches), 1,
    num_patches - 1)`` patches masked uniformly at random (the smallest noise values). Drawn on the CPU, moved to
    ``device``. Shape: -> (batch, num_patches) bool, True = masked."""
    if num_patches < 2:
        raise ValueError(f"num_patches={num_patches} must be >= 2 to mask some patches and keep others")
    ratios = ratio_min + (ratio_max - ratio_min) * torch.rand(batch, 1, generator=generator)
    counts = (ratios * num_patches).round().clamp(1, num_patches - 1)
    ranks = torch.rand(batch, num_patches, generator=generator).argsort(dim=1).argsort(dim=1)
    return host_to_device(ranks < counts, torch.device(device))


@register_method("dinov2")
class DINOv2(SelfDistillation):
    Config = DINOv2Config

    def __init__(self, config: DINOv2Config) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder(pool="cls", depth=config.encoder_depth)
        self.mask_token = nn.Parameter(torch.zeros(self.encoder.embed_dim))
        self.head = DINOHead(self.encoder.feature_dim, config.out_dim, hidden_dim=config.hidden_dim,
                             bottleneck_dim=config.bottleneck_dim)
        self.patch_head = DINOHead(self.encoder.feature_dim, config.patch_out_dim, hidden_dim=config.hidden_dim,
                                   bottleneck_dim=config.bottleneck_dim)
        self.teacher_encoder = frozen_copy(self.encoder)
        self.teacher_head = frozen_copy(self.head)
        self.teacher_patch_head = frozen_copy(self.patch_head)
        self.dino_loss = DINOLoss(config.out_dim, student_temperature=config.student_temperature,
                                  teacher_temperature=config.teacher_temperature,
                                  center_momentum=config.center_momentum,
                                  gather_distributed=config.gather_distributed, centering=config.centering)
        self.ibot_loss = IBOTPatchLoss(config.patch_out_dim, student_temperature=config.student_temperature,
                                       teacher_temperature=config.teacher_temperature,
                                       center_momentum=config.center_momentum, centering=config.centering,
                                       gather_distributed=config.gather_distributed)
        self.koleo_loss = KoLeoLoss()
        self.teacher_temperature_now = teacher_temperature_at(0, 1, config)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.teacher_encoder), (self.head, self.teacher_head),
                (self.patch_head, self.teacher_patch_head)]

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        c = self.config
        global_views = torch.cat([views[k] for k in sorted(views) if k.startswith("global_")])
        local_views = [views[k] for k in sorted(views) if k.startswith("local_")]
        batch = views["global_0"].shape[0]
        temperature = self.teacher_temperature_now
        mask = random_patch_mask(global_views.shape[0], self.encoder.num_patches, c.mask_ratio_min,
                                 c.mask_ratio_max, global_views.device)

        student_tokens = self.encoder.forward_tokens(global_views, mask, self.mask_token)
        student_cls = student_tokens[:, 0]
        student_out = [self.head(student_cls).float()]
        if local_views:
            student_out.append(self.head(self.encoder(torch.cat(local_views))).float())
        student_patches = self.patch_head(student_tokens[:, 1:]).float()
        with torch.no_grad():
            teacher_tokens = self.teacher_encoder.forward_tokens(global_views)
            teacher_out = self.teacher_head(teacher_tokens[:, 0]).float()
            teacher_patches = self.teacher_patch_head(teacher_tokens[:, 1:]).float()

        dino = self.dino_loss(list(torch.cat(student_out).split(batch)), list(teacher_out.split(batch)),
                              teacher_temperature=temperature)
        ibot = self.ibot_loss(student_patches, teacher_patches, mask, teacher_temperature=temperature)
        koleo = sum(self.koleo_loss(crop) for crop in student_cls.float().split(batch))
        loss = dino + c.ibot_loss_weight * ibot + c.koleo_loss_weight * koleo
        logs = {"dino_loss": dino.detach(), "ibot_loss": ibot.detach(), "koleo_loss": koleo.detach(),
                "teacher_temperature": torch.tensor(temperature)}
        return StepOutput(loss, logs)
