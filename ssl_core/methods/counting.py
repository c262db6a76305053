"""Counting visual primitives (Noroozi, Pirsiavash & Favaro 2017): the features of the 4 tiles of an image add
up to the feature of the whole image downsampled to tile size.

``phi = ReLU(Linear(encoder(.)))`` is the counting vector (non-negative, ``count_dim`` primitives). For each image
``x`` with tiles ``T_1..T_4`` (a 2x2 grid, no gap: the tiles partition the image) and ``D x`` (the image
downsampled to tile size), and ``y`` another image of the batch (the next one, cyclically)::

    loss = ||phi(D x) - sum_j phi(T_j x)||^2 + max(0, margin - ||phi(D y) - sum_j phi(T_j x)||^2)

(``ssl_core.losses.CountingLoss``). The contrastive term keeps the trivial all-zero ``phi`` from being a solution.
The downsampling method is drawn per step between area averaging and antialiased bilinear, as the paper draws it
among several, so that the network cannot recognise the downsampled image by its filter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_core.hparams import bounded
from ssl_core.losses import CountingLoss
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.methods.jigsaw import check_tile_config
from ssl_core.tiles import TileGrid, cut_tiles
from ssl_core.views import ViewGenerator, crop_flip_view

DOWNSAMPLE_MODES = ("area", "bilinear")


def downsample(images: Tensor, size: int, mode: str) -> Tensor:
    """Resize to ``size x size``: ``area`` (pixel averaging) or antialiased ``bilinear``. Shape: (B, C, H, W)."""
    if mode == "area":
        return F.interpolate(images, size=(size, size), mode="area")
    if mode == "bilinear":
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    raise ValueError(f"unknown downsampling mode {mode!r}; known: {', '.join(DOWNSAMPLE_MODES)}")


@dataclass(frozen=True)
class CountingConfig(MethodConfig):
    count_dim: int = bounded(1000, 8, 16384)
    margin: float = bounded(10.0, 0.01, 10000.0)

    def check(self) -> None:
        super().check()
        check_tile_config(self, 2, 0, 0, "image_size")


@register_method("counting")
class Counting(SSLMethod):
    Config = CountingConfig

    def __init__(self, config: CountingConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder()
        self.count_head = nn.Sequential(nn.Linear(self.encoder.feature_dim, config.count_dim), nn.ReLU())
        self.grid = TileGrid(config.image_size, 2, 0, 0)
        self.criterion = CountingLoss(config.margin)

    def view_generator(self) -> ViewGenerator:
        """A crop of 60-100% of the image and a flip (the counts must hold for any image, colour is kept)."""
        return ViewGenerator.single_view(crop_flip_view(self.config.image_size, (0.6, 1.0)))

    def counts(self, images: Tensor) -> Tensor:
        """Counting vectors ``phi``. Shape: (B, C, h, w) -> (B, count_dim)."""
        return self.count_head(self.encoder(images)).float()

    def counting_loss(self, images: Tensor, mode: str) -> tuple[Tensor, Tensor]:
        """``(loss, mean ||phi(D x) - sum_j phi(T_j x)||^2)`` with downsampling ``mode``; batch of 2 or more."""
        if images.shape[0] < 2:
            raise ValueError("counting contrasts each image with another one: the batch needs at least 2 images")
        batch, tile_size = images.shape[0], self.grid.tile_size
        tiles = cut_tiles(images, self.grid).flatten(0, 1)
        small = downsample(images, tile_size, mode)
        counts = self.counts(torch.cat([tiles, small]))
        tile_sum = counts[: 4 * batch].view(batch, 4, -1).sum(1)
        whole = counts[4 * batch :]
        loss = self.criterion(whole, tile_sum, whole.roll(1, dims=0))
        return loss, (whole - tile_sum).pow(2).sum(1).mean().detach()

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        mode = DOWNSAMPLE_MODES[int(torch.randint(0, len(DOWNSAMPLE_MODES), ()))]
        loss, mismatch = self.counting_loss(views["view1"], mode)
        return StepOutput(loss, {"count_mismatch": mismatch})
