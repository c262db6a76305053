"""Grid tiles with gap and jitter, and maximal-Hamming permutation sets, against naive references."""

from __future__ import annotations

import itertools

import pytest
import torch

from ssl_core.hparams import FieldValueError
from ssl_core.tiles import (
    TileGrid,
    cut_tiles,
    drop_color_channels,
    jigsaw_tiles,
    maximal_hamming_permutations,
    shuffle_tiles,
)


def _min_pairwise_hamming(perms: torch.Tensor) -> int:
    return min(int((a != b).sum()) for a, b in itertools.combinations(perms, 2))


def test_permutations_are_distinct_deterministic_and_far_apart() -> None:
    perms = maximal_hamming_permutations(12, grid_size=3, seed=7)
    assert perms.shape == (12, 9) and perms.dtype == torch.long
    assert all(sorted(row.tolist()) == list(range(9)) for row in perms)
    assert torch.equal(perms, maximal_hamming_permutations(12, grid_size=3, seed=7))
    assert not torch.equal(perms, maximal_hamming_permutations(12, grid_size=3, seed=8))
    # The greedy set keeps every pair of its 12 orders 8+ cells apart (so all 12 are distinct); 12 random orders
    # come within 5-6 cells of each other.
    assert _min_pairwise_hamming(perms) >= 8
    random_perms = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(s)) for s in range(12)])
    assert _min_pairwise_hamming(perms) > _min_pairwise_hamming(random_perms)


def test_greedy_choice_matches_a_naive_loop_on_a_2x2_grid() -> None:
    """On 4 cells (24 orders) each added order must have the largest minimum distance available at that point."""
    perms = maximal_hamming_permutations(6, grid_size=2, seed=0).tolist()
    all_orders = list(itertools.permutations(range(4)))
    for count in range(1, len(perms)):
        def min_dist(order: tuple[int, ...]) -> int:
            return min(sum(x != y for x, y in zip(order, chosen)) for chosen in perms[:count])

        best = max(min_dist(order) for order in all_orders)
        assert min_dist(tuple(perms[count])) == best


def test_bad_permutation_requests_raise() -> None:
    with pytest.raises(ValueError, match="num_permutations=0"):
        maximal_hamming_permutations(0)
    with pytest.raises(ValueError, match="grid_size=4"):
        maximal_hamming_permutations(10, grid_size=4)


def test_tiles_without_jitter_are_the_naive_crops_of_their_cells() -> None:
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    grid = TileGrid(32, 3, gap=2, jitter=0)
    assert (grid.cell, grid.tile_size, grid.margin) == (10, 8, 1)
    tiles = cut_tiles(images, grid)
    assert tiles.shape == (2, 9, 3, 8, 8)
    for b in range(2):
        for k in range(9):
            top = 1 + (k // 3) * 10 + 1
            left = 1 + (k % 3) * 10 + 1
            assert torch.equal(tiles[b, k], images[b, :, top : top + 8, left : left + 8])


def test_jittered_tiles_stay_in_their_cells_keep_the_gap_and_vary() -> None:
    size, grid = 40, TileGrid(40, 3, gap=3, jitter=2)
    # Each pixel encodes its own (row, col), so a tile tells where it was cut.
    rows = torch.arange(size).view(size, 1).expand(size, size).float()
    cols = torch.arange(size).view(1, size).expand(size, size).float()
    images = torch.stack([rows, cols, rows * 0]).unsqueeze(0).repeat(64, 1, 1, 1)
    tiles = cut_tiles(images, grid, torch.Generator().manual_seed(0))
    tops, lefts = tiles[:, :, 0, 0, 0].long(), tiles[:, :, 1, 0, 0].long()
    t = grid.tile_size
    assert torch.equal(tiles[:, :, 0, -1, 0].long(), tops + t - 1)  # contiguous crops
    for k in range(9):
        cell_top, cell_left = grid.margin + (k // 3) * grid.cell, grid.margin + (k % 3) * grid.cell
        assert (tops[:, k] >= cell_top).all() and (tops[:, k] + t <= cell_top + grid.cell).all()
        assert (lefts[:, k] >= cell_left).all() and (lefts[:, k] + t <= cell_left + grid.cell).all()
    horizontal_gaps = lefts[:, [1, 2, 4, 5, 7, 8]] - (lefts[:, [0, 1, 3, 4, 6, 7]] + t)
    assert horizontal_gaps.min() >= grid.gap
    assert len(set(tops[:, 0].tolist())) == 2 * grid.jitter + 1  # every jitter offset occurs


def test_shuffle_and_jigsaw_follow_the_documented_convention() -> None:
    images = torch.rand(3, 3, 30, 30)
    perms = maximal_hamming_permutations(5, seed=1)
    index = torch.tensor([4, 0, 2])
    tiles = cut_tiles(images, TileGrid(30, 3, 1, 0))
    shuffled = shuffle_tiles(tiles, perms, index)
    puzzle = jigsaw_tiles(images, perms, index, gap=1, jitter=0)
    for b in range(3):
        for i in range(9):
            assert torch.equal(shuffled[b, i], tiles[b, perms[index[b], i]])
    assert torch.equal(puzzle, shuffled)


def test_grid_that_leaves_no_room_names_the_keys() -> None:
    with pytest.raises(FieldValueError, match=r"JigsawConfig\.image_size/tile_gap.* leave tiles of 1 px"):
        TileGrid(16, 3, gap=2, jitter=1).check_fits(4, "image_size/tile_gap/tile_jitter",
                                                    "JigsawConfig.image_size/tile_gap/tile_jitter")
    with pytest.raises(ValueError, match="expected images"):
        cut_tiles(torch.rand(1, 3, 20, 20), TileGrid(32, 3, 0, 0))


def test_colour_dropping_keeps_one_channel_and_replaces_the_others_with_small_noise() -> None:
    tiles = torch.full((50, 9, 3, 4, 4), 5.0)
    dropped = drop_color_channels(tiles, noise_std=0.01, generator=torch.Generator().manual_seed(0))
    kept = (dropped == 5.0).all(-1).all(-1)  # (50, 9, 3)
    assert torch.equal(kept.sum(-1), torch.ones(50, 9, dtype=torch.long))
    assert dropped[~kept].abs().max() < 0.1 and dropped[~kept].std() > 0.001
    assert kept.float().mean(dim=(0, 1)).min() > 0.2  # every channel is sometimes the kept one
