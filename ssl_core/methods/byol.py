"""BYOL (Grill et al. 2020): an online network predicts a momentum target network's projection of another view."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.ema import frozen_copy
from ssl_core.heads import PredictionHead, ProjectionHead
from ssl_core.hparams import bounded
from ssl_core.losses import BYOLLoss
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.views import ViewGenerator, byol_views

PROJECTION_LAYERS = 2


@dataclass(frozen=True)
class BYOLConfig(MethodConfig):
    momentum: float = bounded(0.99, 0.0, 1.0)
    projection_hidden_dim: int = bounded(4096, 16, 16384)
    projection_dim: int = bounded(256, 8, 8192)
    prediction_hidden_dim: int = bounded(4096, 16, 16384)

    def max_finetune_head_layers(self) -> int:
        return PROJECTION_LAYERS


@register_method("byol")
class BYOL(SSLMethod):
    Config = BYOLConfig

    def __init__(self, config: BYOLConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder()
        self.projection_head = ProjectionHead(
            self.encoder.feature_dim, config.projection_hidden_dim, config.projection_dim, num_layers=PROJECTION_LAYERS
        )
        self.prediction_head = PredictionHead(
            config.projection_dim, config.prediction_hidden_dim, config.projection_dim
        )
        self.target_encoder = frozen_copy(self.encoder)
        self.target_projection_head = frozen_copy(self.projection_head)
        self.criterion = BYOLLoss()

    def view_generator(self) -> ViewGenerator:
        return byol_views(self.config.image_size)

    def projection_blocks(self) -> nn.Sequential:
        return self.projection_head.layers

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder), (self.projection_head, self.target_projection_head)]

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        v1, v2 = views["view1"], views["view2"]
        p1, p2 = self.prediction_head(self.projection_head(self.encoder(torch.cat([v1, v2])))).float().chunk(2)
        with torch.no_grad():
            t1 = self.target_projection_head(self.target_encoder(v1)).float()
            t2 = self.target_projection_head(self.target_encoder(v2)).float()
        loss = 0.5 * (self.criterion(p1, t2) + self.criterion(p2, t1))
        return StepOutput(loss)
