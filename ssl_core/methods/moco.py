"""MoCo v2 (He et al. 2020; Chen et al. 2020): InfoNCE of a query against its momentum-encoded key and a queue.

The loss is symmetrised over the two views (as in solo-learn and MoCo v3); both views' keys are enqueued after
the loss is computed. Shuffle-BN is not used: the key encoder sees each view batch on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.ema import frozen_copy
from ssl_core.heads import ProjectionHead
from ssl_core.hparams import bounded
from ssl_core.losses import InfoNCEQueueLoss
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.queue import NegativeQueue
from ssl_core.views import ViewGenerator, moco_views

PROJECTION_LAYERS = 2


@dataclass(frozen=True)
class MoCoConfig(MethodConfig):
    temperature: float = bounded(0.2, 0.01, 10.0)
    queue_size: int = bounded(65536, 16, 1 << 20)
    momentum: float = bounded(0.99, 0.0, 1.0)
    projection_hidden_dim: int = bounded(2048, 16, 16384)
    projection_dim: int = bounded(128, 8, 8192)
    gather_distributed: bool = True

    def max_finetune_head_layers(self) -> int:
        return PROJECTION_LAYERS


@register_method("moco")
class MoCo(SSLMethod):
    Config = MoCoConfig

    def __init__(self, config: MoCoConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder()
        self.projection_head = ProjectionHead(
            self.encoder.feature_dim, config.projection_hidden_dim, config.projection_dim, num_layers=PROJECTION_LAYERS
        )
        self.key_encoder = frozen_copy(self.encoder)
        self.key_projection_head = frozen_copy(self.projection_head)
        self.queue = NegativeQueue(config.queue_size, config.projection_dim, config.gather_distributed)
        self.criterion = InfoNCEQueueLoss(config.temperature)

    def view_generator(self) -> ViewGenerator:
        return moco_views(self.config.image_size)

    def projection_blocks(self) -> nn.Sequential:
        return self.projection_head.layers

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.key_encoder), (self.projection_head, self.key_projection_head)]

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        v1, v2 = views["view1"], views["view2"]
        q1, q2 = self.projection_head(self.encoder(torch.cat([v1, v2]))).float().chunk(2)
        with torch.no_grad():
            k1 = self.key_projection_head(self.key_encoder(v1)).float()
            k2 = self.key_projection_head(self.key_encoder(v2)).float()
        negatives = self.queue.keys.clone()
        loss = 0.5 * (self.criterion(q1, k2, negatives) + self.criterion(q2, k1, negatives))
        self.queue.enqueue(nn.functional.normalize(torch.cat([k1, k2]), dim=1))
        return StepOutput(loss)
