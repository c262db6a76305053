"""Barlow Twins (Zbontar et al. 2021): make the cross-correlation of two views' embeddings the identity."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ssl_core.heads import ProjectionHead
from ssl_core.hparams import bounded
from ssl_core.losses import BarlowTwinsLoss
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.views import ViewGenerator, byol_views


@dataclass(frozen=True)
class BarlowTwinsConfig(MethodConfig):
    lambda_offdiag: float = bounded(5e-3, 0.0, 1.0)
    projection_layers: int = bounded(3, 1, 4)
    projection_hidden_dim: int = bounded(2048, 16, 16384)
    projection_dim: int = bounded(2048, 8, 16384)
    gather_distributed: bool = True

    def max_finetune_head_layers(self) -> int:
        return self.projection_layers


@register_method("barlow_twins")
class BarlowTwins(SSLMethod):
    Config = BarlowTwinsConfig

    def __init__(self, config: BarlowTwinsConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder()
        self.projection_head = ProjectionHead(
            self.encoder.feature_dim,
            config.projection_hidden_dim,
            config.projection_dim,
            num_layers=config.projection_layers,
        )
        self.criterion = BarlowTwinsLoss(config.lambda_offdiag, gather_distributed=config.gather_distributed)

    def view_generator(self) -> ViewGenerator:
        """BYOL's augmentations (Zbontar et al. 2021, Sec. 3)."""
        return byol_views(self.config.image_size)

    def projection_blocks(self) -> nn.Sequential:
        return self.projection_head.layers

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        v1, v2 = views["view1"], views["view2"]
        z1 = self.projection_head(self.encoder(v1)).float()
        z2 = self.projection_head(self.encoder(v2)).float()
        return StepOutput(self.criterion(z1, z2))
