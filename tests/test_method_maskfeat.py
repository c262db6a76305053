"""MaskFeat: its tiny test config, the batched HOG against a naive per-cell loop, and the masked HOG regression."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_core.hog import hog_cells, patch_hog_targets
from ssl_core.methods import build_method, method_config

TINY = {"image_size": 16, "encoder_depth": 1}


def _naive_hog(image: torch.Tensor, cell_size: int, num_bins: int) -> torch.Tensor:
    """One image (C, H, W), pixel by pixel: Sobel gradients with reflect padding, unsigned orientation bins, the
    magnitudes summed per cell and bin, each cell's histogram L2-normalised. -> (C, bins, H / cell, W / cell)."""
    channels, height, width = image.shape
    values = image.double().tolist()

    def pixel(c: int, y: int, x: int) -> float:  # reflect padding: -1 -> 1, H -> H - 2
        y = -y if y < 0 else (2 * (height - 1) - y if y >= height else y)
        x = -x if x < 0 else (2 * (width - 1) - x if x >= width else x)
        return values[c][y][x]

    sobel = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    out = torch.zeros(channels, num_bins, height // cell_size, width // cell_size, dtype=torch.float64)
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                gx = sum(sobel[i][j] * pixel(c, y + i - 1, x + j - 1) for i in range(3) for j in range(3))
                gy = sum(sobel[j][i] * pixel(c, y + i - 1, x + j - 1) for i in range(3) for j in range(3))
                angle = math.atan2(gx, gy)
                bin_index = math.floor(angle / math.pi * num_bins) % num_bins
                out[c, bin_index, y // cell_size, x // cell_size] += math.hypot(gx, gy)
    norms = out.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    return out / norms


def test_hog_matches_a_naive_per_cell_loop() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 12)
    images[1, :, :, 6:] = 0.5  # flat cells: zero gradient inside, histograms stay finite
    cells = hog_cells(images, cell_size=4, num_bins=9)
    assert cells.shape == (2, 3, 9, 2, 3)
    for b in range(2):
        torch.testing.assert_close(cells[b].double(), _naive_hog(images[b], 4, 9), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(cells).all()


def test_patch_targets_group_the_cells_of_each_patch_row_major() -> None:
    torch.manual_seed(1)
    images = torch.rand(2, 3, 8, 8)
    cells = hog_cells(images, cell_size=2, num_bins=4)  # (2, 3, 4, 4, 4)
    targets = patch_hog_targets(images, patch_size=4, cell_size=2, num_bins=4)
    assert targets.shape == (2, 4, 4 * 3 * 4)
    for patch in range(4):
        row, col = divmod(patch, 2)
        expected = [cells[:, :, :, 2 * row + i, 2 * col + j].reshape(2, -1) for i in range(2) for j in range(2)]
        torch.testing.assert_close(targets[:, patch], torch.cat(expected, dim=1))
    with pytest.raises(ValueError, match="patch_size=4 must be a multiple of cell_size=3"):
        patch_hog_targets(images, patch_size=4, cell_size=3)


def test_config_needs_a_vit_and_cells_that_divide_the_patch() -> None:
    with pytest.raises(ValueError, match=r"method\.maskfeat\.hog_cells_per_patch=3 must divide the ViT patch size 4"):
        method_config("maskfeat", {"hog_cells_per_patch": 3, "image_size": 16})
    with pytest.raises(ValueError, match=r"method\.maskfeat\.backbone='resnet8' must be a ViT"):
        method_config("maskfeat", {"backbone": "resnet8"})


def test_step_regresses_the_hog_of_the_masked_patches_only() -> None:
    torch.manual_seed(0)
    method = build_method("maskfeat", TINY)
    assert method.encoder.pool == "mean"
    images = torch.randn(2, 3, 16, 16)
    torch.manual_seed(3)
    out = method.training_step({"view1": images})
    torch.manual_seed(3)
    from ssl_core.augment import random_masking

    _, mask, _ = random_masking(2, method.encoder.num_patches, method.config.mask_ratio)
    assert int(mask.sum()) == 2 * (16 - round(16 * (1 - method.config.mask_ratio)))
    with torch.no_grad():
        prediction = method.predictor(method.encoder.forward_tokens(images, mask.bool(), method.mask_token)[:, 1:])
        target = patch_hog_targets(images, 4, 2, 9)
    squared = [(prediction[b, n] - target[b, n]).pow(2).mean().item()
               for b in range(2) for n in range(16) if mask[b, n] == 1]
    assert out.loss.item() == pytest.approx(sum(squared) / len(squared), rel=1e-5)
