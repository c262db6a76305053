"""Relative patch location (Doersch, Gupta & Efros 2015, context prediction): where does the second patch lie?

Each image is cut into a 3x3 grid of patches with a gap and random jitter (``ssl_core.tiles``); the centre patch
and one of its 8 neighbours, drawn at random, go through the shared encoder, then a shared ``Linear -> ReLU``
(fc6 of the paper's late-fusion pair network); the two embeddings, concatenated (centre first), are classified
into the neighbour's position ``0..7`` (row-major order of the 8 cells around the centre)::

    loss = CE(classifier([patch_fc(encoder(centre)), patch_fc(encoder(neighbour))]), position)

Shortcut guard: the paper found that the net learned to read chromatic aberration (colour fringes that grow with
the distance from the lens centre) and removed it by "color dropping", which ``chromatic_guard`` selects:
``drop_channels`` keeps one random channel of each patch and replaces the others with small Gaussian noise
(``ssl_core.tiles.drop_color_channels``), ``grayscale`` gives the encoder luma only, ``none`` keeps colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_core.augment import ViewConfig, rgb_to_grayscale
from ssl_core.hparams import bounded
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.methods.jigsaw import check_tile_config
from ssl_core.tiles import TileGrid, cut_tiles, drop_color_channels
from ssl_core.views import ViewGenerator

CENTRE = 4
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)
"""The grid cells (row-major in the 3x3 grid) of the 8 classes: class ``k`` is cell ``NEIGHBOURS[k]``."""


@dataclass(frozen=True)
class RelativeLocationConfig(MethodConfig):
    tile_gap: int = bounded(2, 0, 256)
    tile_jitter: int = bounded(1, 0, 128)
    patch_dim: int = bounded(256, 8, 8192)
    hidden_dim: int = bounded(512, 16, 16384)
    chromatic_guard: str = bounded("drop_channels", choices=("drop_channels", "grayscale", "none"))
    drop_noise_std: float = bounded(0.01, 0.0, 1.0)

    def check(self) -> None:
        super().check()
        check_tile_config(self, 3, self.tile_gap, self.tile_jitter, "image_size/tile_gap/tile_jitter")


def apply_chromatic_guard(patches: Tensor, guard: str, noise_std: float) -> Tensor:
    """``drop_channels``, ``grayscale`` (luma on all three channels) or ``none``. Shape: (..., 3, H, W)."""
    if guard == "drop_channels":
        return drop_color_channels(patches, noise_std)
    if guard == "grayscale":
        flat = patches.flatten(0, -4)
        return rgb_to_grayscale(flat).expand_as(flat).reshape(patches.shape)
    if guard == "none":
        return patches
    raise ValueError(f"unknown chromatic_guard {guard!r}; known: drop_channels, grayscale, none")


@register_method("relative_location")
class RelativeLocation(SSLMethod):
    Config = RelativeLocationConfig

    def __init__(self, config: RelativeLocationConfig) -> None:
        super().__init__(config)
        self.encoder = self.build_encoder()
        self.grid = TileGrid(config.image_size, 3, config.tile_gap, config.tile_jitter)
        self.register_buffer("neighbour_cells", torch.tensor(NEIGHBOURS), persistent=False)
        self.patch_fc = nn.Sequential(nn.Linear(self.encoder.feature_dim, config.patch_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            nn.Linear(2 * config.patch_dim, config.hidden_dim),
            nn.BatchNorm1d(config.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(config.hidden_dim, len(NEIGHBOURS)),
        )

    def view_generator(self) -> ViewGenerator:
        """A crop of 60-100% of the image and a flip; no colour change (the guard handles colour)."""
        return ViewGenerator.single_view(
            ViewConfig(self.config.image_size, crop_scale=(0.6, 1.0), jitter_prob=0.0, grayscale_prob=0.0)
        )

    def pair_logits(self, centre: Tensor, neighbour: Tensor) -> Tensor:
        """Position logits of (centre, neighbour) patch pairs. Shape: 2 x (B, C, t, t) -> (B, 8)."""
        embeddings = self.patch_fc(self.encoder(torch.cat([centre, neighbour])))
        first, second = embeddings.chunk(2)
        return self.classifier(torch.cat([first, second], dim=1))

    def pairs(
        self, images: Tensor, position: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """The centre patch and the neighbour at class ``position`` of every image, before the colour guard."""
        tiles = cut_tiles(images, self.grid, generator)
        cells = self.neighbour_cells.to(images.device)[position]
        neighbour = tiles[torch.arange(images.shape[0], device=images.device), cells]
        return tiles[:, CENTRE], neighbour

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        images = views["view1"]
        position = torch.randint(0, len(NEIGHBOURS), (images.shape[0],), device=images.device)
        centre, neighbour = self.pairs(images, position)
        c = self.config
        centre = apply_chromatic_guard(centre, c.chromatic_guard, c.drop_noise_std)
        neighbour = apply_chromatic_guard(neighbour, c.chromatic_guard, c.drop_noise_std)
        logits = self.pair_logits(centre, neighbour).float()
        loss = nn.functional.cross_entropy(logits, position)
        accuracy = (logits.argmax(1) == position).float().mean().detach()
        return StepOutput(loss, {"location_accuracy": accuracy})
