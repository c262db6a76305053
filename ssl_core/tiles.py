"""Grid tiles of a batch of images, with a gap and random jitter, and jigsaw permutation sets.

Used by the tile-based pretext tasks (``jigsaw``, ``relative_location``, ``counting``) and by PIRL's jigsaw view.

Geometry (``TileGrid``): the image side ``S`` is split into ``grid_size`` cells of ``cell = S // grid_size``
pixels (the grid is centred; ``S mod grid_size`` pixels are left out). Every tile is a square of
``tile_size = cell - gap - 2 * jitter`` pixels, centred in its cell and then shifted by an independent random
integer offset in ``[-jitter, jitter]`` on each axis, per image and per tile. Two neighbouring tiles are thus at
least ``gap`` pixels apart, so neither a continuing edge nor a matching border texture gives the answer away
(Noroozi & Favaro 2016, Sec. 3.2; Doersch et al. 2015, Sec. 3: "a gap ... and randomly jitter each patch").

Tile order is row-major: tile ``k`` is the cell at row ``k // grid_size``, column ``k % grid_size``.

Permutations (``maximal_hamming_permutations``): the jigsaw classes. Noroozi & Favaro (2016, Sec. 3.3, Alg. 1)
choose ``N`` of the ``9!`` orders greedily so that the minimum Hamming distance between any two is as large as
possible: start from one order, then repeatedly add the order whose minimum distance to those chosen is
largest (ties broken at random). Deterministic given ``seed``.

Convention (``shuffle_tiles``): ``shuffled[:, i] = tiles[:, permutation[i]]``, i.e. position ``i`` of the
shuffled puzzle shows the tile of cell ``permutation[i]``.

All ops are batched (no Python loop over images) and run on the images' device. Random draws come from
``generator`` on its own device (a CPU generator gives the same tiles on CPU and CUDA) or, for ``None``, from
torch's global generator of the images' device.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ssl_core.augment import host_to_device
from ssl_core.hparams import FieldValueError

MAX_PERMUTATION_CELLS = 9
"""All orders of the cells are enumerated (``9! = 362880``), so permutation sets are for grids up to 3x3."""


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of a ``grid_size x grid_size`` grid lie in an ``image_size`` square image.

    ``cell = image_size // grid_size``; ``tile_size = cell - gap - 2 * jitter``; ``margin = (image_size -
    grid_size * cell) // 2`` is the offset of the grid from the top-left corner.
    """

    image_size: int
    grid_size: int
    gap: int
    jitter: int

    def __post_init__(self) -> None:
        for name in ("image_size", "grid_size", "gap", "jitter"):
            value = getattr(self, name)
            low = 1 if name in ("image_size", "grid_size") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TileGrid.{name}={value!r} must be an int >= {low}")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid_size

    @property
    def tile_size(self) -> int:
        return self.cell - self.gap - 2 * self.jitter

    @property
    def margin(self) -> int:
        return (self.image_size - self.grid_size * self.cell) // 2

    @property
    def num_tiles(self) -> int:
        return self.grid_size**2

    def check_fits(self, min_tile_size: int, keys: str, where: str) -> None:
        """Raise ``FieldValueError`` (field ``keys``, e.g. ``"image_size/tile_gap/tile_jitter"``) unless every tile
        is at least ``min_tile_size`` pixels wide."""
        if self.tile_size < min_tile_size:
            raise FieldValueError(
                keys,
                (self.image_size, self.gap, self.jitter),
                f"leave tiles of {self.tile_size} px in a {self.grid_size}x{self.grid_size} grid "
                f"(image_size // {self.grid_size} - gap - 2 * jitter); need at least {min_tile_size} px: "
                "raise image_size or lower the gap or jitter",
                where,
            )

    def tile_corners(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """``(top, left)`` pixel corner of every tile, each ``(batch_size, num_tiles)`` long, jittered at random."""
        device = torch.device(device)
        index = torch.arange(self.num_tiles, device=device)
        centre_offset = self.margin + (self.gap + 1) // 2 + self.jitter
        base_top = (index // self.grid_size) * self.cell + centre_offset
        base_left = (index % self.grid_size) * self.cell + centre_offset
        if self.jitter == 0:
            zeros = torch.zeros(batch_size, self.num_tiles, dtype=torch.long, device=device)
            return base_top + zeros, base_left + zeros
        draw_device = generator.device if generator is not None else device
        shifts = torch.randint(
            -self.jitter, self.jitter + 1, (2, batch_size, self.num_tiles), generator=generator, device=draw_device
        )
        shifts = host_to_device(shifts, device)
        return base_top + shifts[0], base_left + shifts[1]


def cut_tiles(images: Tensor, grid: TileGrid, generator: torch.Generator | None = None) -> Tensor:
    """The ``grid.num_tiles`` jittered tiles of every image, in row-major cell order.

    Shape: (B, C, S, S) with ``S == grid.image_size`` -> (B, grid_size**2, C, tile_size, tile_size).
    """
    if images.ndim != 4 or images.shape[-1] != grid.image_size or images.shape[-2] != grid.image_size:
        raise ValueError(f"expected images (B, C, {grid.image_size}, {grid.image_size}), got {tuple(images.shape)}")
    if grid.tile_size < 1:
        raise ValueError(f"{grid} leaves tiles of {grid.tile_size} px")
    batch = images.shape[0]
    top, left = grid.tile_corners(batch, generator, images.device)
    offsets = torch.arange(grid.tile_size, device=images.device)
    rows = (top.unsqueeze(-1) + offsets).view(batch, grid.num_tiles, grid.tile_size, 1)
    cols = (left.unsqueeze(-1) + offsets).view(batch, grid.num_tiles, 1, grid.tile_size)
    sample = torch.arange(batch, device=images.device).view(batch, 1, 1, 1)
    tiles = images.permute(0, 2, 3, 1)[sample, rows, cols]  # (B, K, t, t, C)
    return tiles.permute(0, 1, 4, 2, 3)


def shuffle_tiles(tiles: Tensor, permutations: Tensor, permutation_index: Tensor) -> Tensor:
    """Reorder each image's tiles by its permutation: ``out[b, i] = tiles[b, permutations[permutation_index[b], i]]``.

    Shape: tiles (B, K, ...), permutations (N, K) long, permutation_index (B,) long -> (B, K, ...).
    """
    if permutations.ndim != 2 or permutations.shape[1] != tiles.shape[1]:
        raise ValueError(f"permutations {tuple(permutations.shape)} do not order {tiles.shape[1]} tiles")
    order = permutations.to(tiles.device)[permutation_index.to(tiles.device)]  # (B, K)
    sample = torch.arange(tiles.shape[0], device=tiles.device).unsqueeze(1)
    return tiles[sample, order]


def jigsaw_tiles(
    images: Tensor,
    permutations: Tensor,
    permutation_index: Tensor,
    *,
    gap: int,
    jitter: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The jigsaw puzzle of every image: its tiles cut with ``gap`` and ``jitter`` (grid side ``sqrt(K)`` from
    ``permutations``' width ``K``), shuffled by ``permutations[permutation_index[b]]`` (see ``shuffle_tiles``).

    Shape: images (B, C, S, S), permutations (N, K), permutation_index (B,) -> (B, K, C, t, t).
    """
    grid_size = math.isqrt(permutations.shape[-1])
    if grid_size**2 != permutations.shape[-1]:
        raise ValueError(f"permutations of width {permutations.shape[-1]} do not order a square grid")
    grid = TileGrid(images.shape[-1], grid_size, gap, jitter)
    return shuffle_tiles(cut_tiles(images, grid, generator), permutations, permutation_index)


@functools.lru_cache(maxsize=2)
def _all_orders(num_cells: int) -> Tensor:
    return torch.tensor(list(itertools.permutations(range(num_cells))), dtype=torch.uint8)


def maximal_hamming_permutations(num_permutations: int, grid_size: int = 3, seed: int = 0) -> Tensor:
    """``num_permutations`` orders of the ``grid_size**2`` cells with a maximal minimum pairwise Hamming distance.

    Greedy (Noroozi & Favaro 2016, Alg. 1): the first order is drawn at random; each next one is, among all
    orders, one whose minimum Hamming distance to the orders chosen so far is largest (a random one among ties).
    Deterministic given ``seed``; the result is cached (a fresh copy is returned), since 100 orders of 9 cells take
    seconds. Shape: -> (num_permutations, grid_size**2) long, rows distinct.
    """
    return _maximal_hamming_permutations(num_permutations, grid_size, seed).clone()


@functools.lru_cache(maxsize=16)
def _maximal_hamming_permutations(num_permutations: int, grid_size: int, seed: int) -> Tensor:
    num_cells = grid_size**2
    if not 2 <= num_cells <= MAX_PERMUTATION_CELLS:
        raise ValueError(f"grid_size={grid_size}: permutation sets are for 2x2 and 3x3 grids")
    orders = _all_orders(num_cells)
    if not 1 <= num_permutations <= orders.shape[0]:
        raise ValueError(f"num_permutations={num_permutations} must be in [1, {orders.shape[0]}] for {num_cells} cells")
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(orders.shape[0], (1,), generator=generator))]
    min_distance = torch.full((orders.shape[0],), num_cells + 1, dtype=torch.int16)
    for _ in range(num_permutations - 1):
        distance = (orders != orders[chosen[-1]]).sum(1, dtype=torch.int16)
        min_distance = torch.minimum(min_distance, distance)
        candidates = torch.nonzero(min_distance == min_distance.max()).squeeze(1)
        chosen.append(int(candidates[torch.randint(candidates.numel(), (1,), generator=generator)]))
    return orders[chosen].long()


def drop_color_channels(tiles: Tensor, noise_std: float = 0.01, generator: torch.Generator | None = None) -> Tensor:
    """Doersch et al. (2015, Sec. 4.2) "color dropping": per tile keep one random channel of three and replace
    the other two with Gaussian noise of std ``noise_std``, so that chromatic aberration (colour fringes that
    shift with the distance to the lens centre) cannot reveal where a patch lies.

    Shape: (..., 3, H, W) -> (..., 3, H, W).
    """
    if tiles.ndim < 3 or tiles.shape[-3] != 3:
        raise ValueError(f"expected tiles (..., 3, H, W), got {tuple(tiles.shape)}")
    lead = tiles.shape[:-3]
    draw_device = generator.device if generator is not None else tiles.device
    kept = host_to_device(torch.randint(0, 3, lead, generator=generator, device=draw_device), tiles.device)
    noise = torch.randn(tiles.shape, generator=generator, device=draw_device, dtype=torch.float32)
    noise = host_to_device(noise, tiles.device).to(tiles.dtype) * noise_std
    channel = torch.arange(3, device=tiles.device).view(*([1] * len(lead)), 3, 1, 1)
    keep = channel == kept.view(*lead, 1, 1, 1)
    return torch.where(keep, tiles, noise)
