"""Jigsaw puzzles (Noroozi & Favaro 2016, the context-free network): classify the permutation of 3x3 tiles.

Each image is cut into a 3x3 grid of tiles with a gap and random jitter (``ssl_core.tiles``), the tiles are
shuffled by one of ``num_permutations`` orders chosen for a maximal minimum Hamming distance, every tile goes
through the shared encoder on its own (the encoder sees ``tile_size`` px crops: our ResNets are fully
convolutional with global pooling), then a shared per-tile ``Linear -> ReLU`` (the paper's fc6), and the 9 tile
embeddings, concatenated in puzzle order, are classified into the permutation index::

    loss = CE(classifier(concat_i tile_fc(encoder(tile_{perm[i]}))), perm)

Shortcut guards from the paper: gap and jitter between tiles; per-tile normalisation (each tile's channels to
zero mean and unit variance, so low-level statistics do not line up); grayscale and colour jitter in the views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.augment import ViewConfig
from ssl_core.hparams import FieldValueError, bounded
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.tiles import TileGrid, jigsaw_tiles, maximal_hamming_permutations
from ssl_core.views import ViewGenerator

MIN_TILE_SIZE = 4
"""Smallest tile side (pixels) a tile-based method accepts at config load."""


def check_tile_config(config: MethodConfig, grid_size: int, gap: int, jitter: int, keys: str) -> None:
    """The shared config rules of tile-based methods: a convolutional backbone (tiles are smaller than the image, a
    ViT is built for one input size) and tiles of at least ``MIN_TILE_SIZE`` px; errors name ``keys``."""
    name = type(config).__name__
    if config.backbone.startswith("vit_"):
        raise FieldValueError("backbone", config.backbone,
                              "must be a convolutional backbone: tiles are smaller than the image", f"{name}.backbone")
    TileGrid(config.image_size, grid_size, gap, jitter).check_fits(MIN_TILE_SIZE, keys, f"{name}.{keys}")


def standardize_tiles(tiles: Tensor, eps: float = 1e-5) -> Tensor:
    """Each tile's channels to zero mean and unit variance over its pixels (Noroozi & Favaro 2016, Sec. 3.2).
    Shape: (..., C, H, W) -> (..., C, H, W)."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.var(dim=(-2, -1), keepdim=True, unbiased=False).add(eps).sqrt()
    return (tiles - mean) / std


@dataclass(frozen=True)
class JigsawConfig(MethodConfig):
    num_permutations: int = bounded(100, 2, 1000)
    permutation_seed: int = bounded(0, 0, 2**31 - 1)
    tile_gap: int = bounded(2, 0, 256)
    tile_jitter: int = bounded(1, 0, 128)
    tile_dim: int = bounded(256, 8, 8192)
    hidden_dim: int = bounded(1024, 16, 16384)
    standardize_tiles: bool = True

    def check(self) -> None:
        super().check()
        check_tile_config(self, 3, self.tile_gap, self.tile_jitter, "image_size/tile_gap/tile_jitter")


@register_method("jigsaw")
class Jigsaw(SSLMethod):
    Config = JigsawConfig

    def __init__(self, config: JigsawConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder()
        self.tile_fc = nn.Sequential(nn.Linear(self.encoder.feature_dim, config.tile_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            nn.Linear(9 * config.tile_dim, config.hidden_dim),
            nn.BatchNorm1d(config.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(config.hidden_dim, config.num_permutations),
        )
        permutations = maximal_hamming_permutations(config.num_permutations, 3, config.permutation_seed)
        self.register_buffer("permutations", permutations, persistent=False)

    def view_generator(self) -> ViewGenerator:
        """A crop of 60-100% of the image, flip, colour jitter and 30% grayscale (the paper's colour guards)."""
        return ViewGenerator.single_view(ViewConfig(self.config.image_size, crop_scale=(0.6, 1.0), grayscale_prob=0.3))

    def puzzle_logits(self, tiles: Tensor) -> Tensor:
        """Permutation logits of shuffled puzzles. Shape: (B, 9, C, t, t) -> (B, num_permutations)."""
        batch = tiles.shape[0]
        if self.config.standardize_tiles:
            tiles = standardize_tiles(tiles)
        embeddings = self.tile_fc(self.encoder(tiles.flatten(0, 1)))
        return self.classifier(embeddings.view(batch, -1))

    def puzzle_loss(
        self, images: Tensor, permutation_index: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(loss, logits)`` of the puzzles of ``images`` shuffled by ``permutations[permutation_index]``."""
        c = self.config
        tiles = jigsaw_tiles(images, self.permutations, permutation_index, gap=c.tile_gap, jitter=c.tile_jitter,
                             generator=generator)
        logits = self.puzzle_logits(tiles).float()
        return nn.functional.cross_entropy(logits, permutation_index), logits

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        images = views["view1"]
        index = torch.randint(0, self.config.num_permutations, (images.shape[0],), device=images.device)
        loss, logits = self.puzzle_loss(images, index)
        accuracy = (logits.argmax(1) == index).float().mean().detach()
        return StepOutput(loss, {"jigsaw_accuracy": accuracy})
