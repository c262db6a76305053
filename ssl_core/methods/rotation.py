"""Rotation prediction (Gidaris et al. 2018): classify which multiple of 90 degrees each image was rotated by."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.hparams import bounded
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.views import ViewGenerator, crop_flip_view


def rotate_batch(images: Tensor, quarter_turns: Tensor) -> Tensor:
    """Rotate each square image ``i`` of (B,C,H,H) by ``quarter_turns[i]`` x 90 degrees counter-clockwise."""
    rotated = images.clone()
    for k in range(1, 4):
        selected = quarter_turns == k
        rotated[selected] = torch.rot90(images[selected], k, dims=(2, 3))
    return rotated


@dataclass(frozen=True)
class RotationConfig(MethodConfig):
    hidden_dim: int = bounded(512, 16, 16384)


@register_method("rotation")
class Rotation(SSLMethod):
    Config = RotationConfig

    def __init__(self, config: RotationConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder()
        self.classifier = nn.Sequential(
            nn.Linear(self.encoder.feature_dim, config.hidden_dim),
            nn.BatchNorm1d(config.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(config.hidden_dim, 4),
        )

    def view_generator(self) -> ViewGenerator:
        """Light geometric augmentation only: the rotation itself is the pretext label."""
        return ViewGenerator.single_view(crop_flip_view(self.config.image_size, (0.6, 1.0)))

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        images = views["view1"]
        quarter_turns = torch.randint(0, 4, (images.shape[0],), device=images.device)
        logits = self.classifier(self.encoder(rotate_batch(images, quarter_turns))).float()
        loss = nn.functional.cross_entropy(logits, quarter_turns)
        accuracy = (logits.argmax(1) == quarter_turns).float().mean().detach()
        return StepOutput(loss, {"rotation_accuracy": accuracy})
