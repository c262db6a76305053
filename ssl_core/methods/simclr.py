"""SimCLR / SimCLRv2 (Chen et al. 2020a, 2020b): NT-Xent between two views of each image.

The projection head ends in batch norm, as in both papers' code.

SimCLRv2 = a deeper (3-layer) projection head; fine-tuning later starts from the output of its first layer
(``finetune_head(1)``).

SimCLRv2's memory (Chen et al. 2020b, Sec. 2, after MoCo): ``queue_size > 0`` adds a momentum copy of the encoder
and projection head (EMA ``momentum``, cosine to 1 over training) whose outputs for both views are queued
(``ssl_core.queue.NegativeQueue``, all-gathered under DDP) and serve as extra negatives in every anchor's NT-Xent
denominator. Memory: ``queue_size x projection_dim`` float32, plus the momentum copy's weights.
``queue_size: 0`` (default) is plain SimCLR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.ema import frozen_copy
from ssl_core.heads import ProjectionHead
from ssl_core.hparams import bounded
from ssl_core.losses import NTXentLoss
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.queue import NegativeQueue
from ssl_core.views import ViewGenerator, simclr_views


@dataclass(frozen=True)
class SimCLRConfig(MethodConfig):
    temperature: float = bounded(0.5, 0.01, 10.0)
    projection_layers: int = bounded(3, 1, 4)
    projection_hidden_dim: int = bounded(2048, 16, 16384)
    projection_dim: int = bounded(128, 8, 8192)
    queue_size: int = bounded(0, 0, 1 << 20)
    """SimCLRv2's memory of negatives from a momentum network; 0: off."""
    momentum: float = bounded(0.999, 0.0, 1.0)
    """EMA momentum of the network that fills the queue (used only with ``queue_size > 0``)."""
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
        self.queue: NegativeQueue | None = None
        if config.queue_size > 0:
            self.key_encoder = frozen_copy(self.encoder)
            self.key_projection_head = frozen_copy(self.projection_head)
            self.queue = NegativeQueue(config.queue_size, config.projection_dim, config.gather_distributed)

    def view_generator(self) -> ViewGenerator:
        return simclr_views(self.config.image_size)

    def projection_blocks(self) -> nn.Sequential:
        return self.projection_head.layers

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        if self.queue is None:
            return []
        return [(self.encoder, self.key_encoder), (self.projection_head, self.key_projection_head)]

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        both = torch.cat([views["view1"], views["view2"]])
        z1, z2 = self.projection_head(self.encoder(both)).float().chunk(2)
        if self.queue is None:
            return StepOutput(self.criterion(z1, z2))
        with torch.no_grad():
            keys = self.key_projection_head(self.key_encoder(both)).float()
        loss = self.criterion(z1, z2, self.queue.keys.clone())
        self.queue.enqueue(nn.functional.normalize(keys, dim=1))
        return StepOutput(loss)
