"""SimCLR / SimCLRv2 (Chen et al. 2020a, 2020b): NT-Xent between two views of each image.

The projection head ends in batch norm, as in both papers' code.

SimCLRv2 = a deeper (3-layer) projection head; fine-tuning later starts from the output of its first layer
(``finetune_head(1)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.heads import ProjectionHead
from ssl_core.hparams import bounded
from ssl_core.losses import NTXentLoss
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.views import ViewGenerator, simclr_views


@dataclass(frozen=True)
class SimCLRConfig(MethodConfig):
    temperature: float = bounded(0.5, 0.01, 10.0)
    projection_layers: int = bounded(3, 1, 4)
    projection_hidden_dim: int = bounded(2048, 16, 16384)
    projection_dim: int = bounded(128, 8, 8192)
    gather_distributed: bool = True

    def max_finetune_head_layers(self) -> int:
        return self.projection_layers


@register_method("simclr")
class SimCLR(SSLMethod):
    Config = SimCLRConfig

    def __init__(self, config: SimCLRConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder()
        self.projection_head = ProjectionHead(
            self.encoder.feature_dim,
            config.projection_hidden_dim,
            config.projection_dim,
            num_layers=config.projection_layers,
            last_norm=True,
        )
        self.criterion = NTXentLoss(config.temperature, gather_distributed=config.gather_distributed)

    def view_generator(self) -> ViewGenerator:
        return simclr_views(self.config.image_size)

    def projection_blocks(self) -> nn.Sequential:
        return self.projection_head.layers

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        both = torch.cat([views["view1"], views["view2"]])
        z1, z2 = self.projection_head(self.encoder(both)).float().chunk(2)
        return StepOutput(self.criterion(z1, z2))
