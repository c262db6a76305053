"""PIRL (Misra & van der Maaten 2020, "Self-Supervised Learning of Pretext-Invariant Representations").

The representation of an image and of its jigsaw-transformed version are pulled together, against negatives drawn
from a memory bank of the images' representations:

- ``f(v_I) = normalize(W_f encoder(I))`` of the whole image (``views["view1"]``);
- ``g(v_{I^t})``: the second view cut into a 3x3 grid of tiles with a gap and jitter and shuffled by a random
  permutation per image (``ssl_core.tiles``), each tile through the shared encoder and ``W_tile``, the 9 tile
  embeddings concatenated and projected by ``W_g``, then L2-normalised;
- the memory bank holds ``m_I``, the momentum average of ``f(v_I)`` (``ssl_core.memory_bank``);
- the loss (the paper's eq. 5), with NPID's NCE (``ssl_core.losses.NCELoss``) over ``K`` negatives drawn from the
  bank once per step, shared by the batch::

      loss = loss_weight * NCE(m_I . g(v_It), m_I' . g(v_It)) + (1 - loss_weight) * NCE(m_I . f(v_I), m_I' . f(v_I))

The two terms each keep their own NCE normaliser ``Z`` (estimated on the first step, then fixed).
Memory: the bank, ``N x embedding_dim`` float32 on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_core.hparams import bounded
from ssl_core.losses import NCELoss
from ssl_core.memory_bank import MemoryBank, check_bank_size, sized_bank_config
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method, row_index
from ssl_core.methods.jigsaw import check_tile_config
from ssl_core.methods.npid import fixed_normalizer
from ssl_core.tiles import jigsaw_tiles
from ssl_core.views import ViewGenerator, moco_views

NUM_TILES = 9


@dataclass(frozen=True)
class PIRLConfig(MethodConfig):
    temperature: float = bounded(0.07, 0.01, 10.0)
    loss_weight: float = bounded(0.5, 0.0, 1.0)
    """lambda: weight of the jigsaw term; 1 - lambda weighs the image term (the paper: 0.5)."""
    num_negatives: int = bounded(4096, 1, 1 << 20)
    """Negatives drawn from the bank per step (the paper: 32000)."""
    embedding_dim: int = bounded(128, 8, 8192)
    tile_gap: int = bounded(2, 0, 256)
    tile_jitter: int = bounded(1, 0, 128)
    bank_momentum: float = bounded(0.5, 0.0, 0.999)
    bank_size: int = bounded(0, 0, 1 << 31)
    """Rows of the memory bank = training images; 0: set by the pipeline from the train split."""
    gather_distributed: bool = True

    def check(self) -> None:
        super().check()
        check_tile_config(self, 3, self.tile_gap, self.tile_jitter, "image_size/tile_gap/tile_jitter")

    def for_train_rows(self, train_rows: int) -> PIRLConfig:
        return sized_bank_config(self, train_rows)


@register_method("pirl")
class PIRL(SSLMethod):
    Config = PIRLConfig

    normalizer_jigsaw: Tensor
    normalizer_image: Tensor

    def __init__(self, config: PIRLConfig) -> None:
        super().__init__(config)
        check_bank_size(self.name, config.bank_size)
        self.encoder = self.build_encoder()
        dim = config.embedding_dim
        self.image_embedding = nn.Linear(self.encoder.feature_dim, dim)
        self.tile_embedding = nn.Linear(self.encoder.feature_dim, dim)
        self.jigsaw_embedding = nn.Linear(NUM_TILES * dim, dim)
        self.bank = MemoryBank(config.bank_size, dim, config.gather_distributed)
        self.criterion = NCELoss(config.temperature)
        self.register_buffer("normalizer_jigsaw", torch.zeros(()))
        self.register_buffer("normalizer_image", torch.zeros(()))

    def view_generator(self) -> ViewGenerator:
        return moco_views(self.config.image_size)

    def jigsaw_features(self, images: Tensor) -> Tensor:
        """``g(v_{I^t})``: 3x3 tiles (gap, jitter) in a random order per image, encoded, concatenated, projected,
        L2-normalised. Shape: (B, C, S, S) -> (B, embedding_dim)."""
        c = self.config
        batch = images.shape[0]
        order = torch.argsort(torch.rand(batch, NUM_TILES, device=images.device), dim=1)
        tiles = jigsaw_tiles(images, order, torch.arange(batch, device=images.device), gap=c.tile_gap,
                             jitter=c.tile_jitter)
        tile_features = self.tile_embedding(self.encoder(tiles.flatten(0, 1)))
        return F.normalize(self.jigsaw_embedding(tile_features.reshape(batch, -1)).float(), dim=1)

    def _nce(self, features: Tensor, memory: Tensor, negatives: Tensor, normalizer: Tensor) -> Tensor:
        c = self.config
        positive_scores = (features * memory).sum(dim=1)
        negative_scores = features @ negatives.T
        z = fixed_normalizer(normalizer, self.criterion, positive_scores, negative_scores, c.bank_size,
                             c.gather_distributed)
        return self.criterion(positive_scores, negative_scores, z, c.bank_size)

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        c = self.config
        rows = row_index(views, self.name)
        image = F.normalize(self.image_embedding(self.encoder(views["view1"])).float(), dim=1)
        jigsaw = self.jigsaw_features(views["view2"])
        memory = self.bank.rows(rows)
        negatives = self.bank.rows(self.bank.sample_rows((c.num_negatives,)))
        jigsaw_loss = self._nce(jigsaw, memory, negatives, self.normalizer_jigsaw)
        image_loss = self._nce(image, memory, negatives, self.normalizer_image)
        self.bank.update(rows, image, c.bank_momentum)
        loss = c.loss_weight * jigsaw_loss + (1 - c.loss_weight) * image_loss
        return StepOutput(loss, {"jigsaw_nce_loss": jigsaw_loss.detach(), "image_nce_loss": image_loss.detach()})
