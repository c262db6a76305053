"""Histograms of oriented gradients (Dalal & Triggs 2005) of a batch, on its device: MaskFeat's targets.

MaskFeat (Wei et al. 2022) regresses the HOG of masked patches; its code (SlowFast's ``HOGLayerC``) computes, per
colour channel: Sobel gradients with reflect padding, an unsigned orientation hard-assigned to one of
``num_bins`` bins over [0, pi), the gradient magnitude summed per bin over each ``cell_size`` square cell, and each
cell's histogram L2-normalised. ``hog_cells`` does exactly that (without SlowFast's optional Gaussian window):

    gx = I * [[1, 0, -1], [2, 0, -2], [1, 0, -1]],   gy = I * its transpose   (cross-correlation, reflect pad 1)
    bin(p) = floor(atan2(gx, gy) / pi * num_bins) mod num_bins,   magnitude(p) = sqrt(gx^2 + gy^2)
    h[c, k, cell] = sum_{p in cell, bin(p) = k} magnitude(p),   then h[c, :, cell] /= max(||h[c, :, cell]||_2, 1e-12)

``patch_hog_targets`` regroups the cells by ViT patch, row-major like ``VisionTransformer.patchify``: each patch's
target lists, for each of its cells (row-major), the ``3 x num_bins`` values (channel-major).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_SOBEL = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
_NORM_EPS = 1e-12  # F.normalize's default


def image_gradients(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel Sobel gradients ``(gx, gy)`` with reflect padding. Shape: (B, C, H, W) -> 2 x (B, C, H, W)."""
    if images.ndim != 4 or min(images.shape[2:]) < 2:
        raise ValueError(f"images must have shape (B, C, H >= 2, W >= 2), got {tuple(images.shape)}")
    channels = images.shape[1]
    kernel_x = torch.tensor(_SOBEL, dtype=images.dtype, device=images.device)
    kernels = torch.stack([kernel_x, kernel_x.T]).unsqueeze(1).repeat(channels, 1, 1, 1)  # (2C, 1, 3, 3)
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    gradients = F.conv2d(padded.repeat_interleave(2, dim=1), kernels, groups=2 * channels)
    return gradients[:, 0::2], gradients[:, 1::2]


def hog_cells(images: Tensor, cell_size: int, num_bins: int = 9) -> Tensor:
    """L2-normalised orientation histograms of every ``cell_size`` cell of every channel (module docstring).

    Computed in float32. Shape: (B, C, H, W), H and W multiples of ``cell_size`` -> (B, C, num_bins, H / cell,
    W / cell).
    """
    if cell_size < 1 or num_bins < 1:
        raise ValueError(f"cell_size={cell_size} and num_bins={num_bins} must be >= 1")
    if images.ndim != 4 or images.shape[2] % cell_size or images.shape[3] % cell_size:
        raise ValueError(f"images must be (B, C, H, W) with H and W multiples of cell_size={cell_size}, "
                         f"got {tuple(images.shape)}")
    with torch.autocast(images.device.type, enabled=False):
        gx, gy = image_gradients(images.float())
        magnitude = torch.sqrt(gx**2 + gy**2)
        bins = torch.floor(torch.atan2(gx, gy) / math.pi * num_bins).long().remainder(num_bins)
        batch, channels, height, width = images.shape
        per_bin = magnitude.new_zeros(batch, channels, num_bins, height, width)
        per_bin.scatter_(2, bins.unsqueeze(2), magnitude.unsqueeze(2))
        cells = F.avg_pool2d(per_bin.flatten(1, 2), cell_size) * cell_size**2  # sum over each cell
        cells = cells.view(batch, channels, num_bins, height // cell_size, width // cell_size)
        return F.normalize(cells, p=2, dim=2, eps=_NORM_EPS)


def patch_hog_targets(images: Tensor, patch_size: int, cell_size: int, num_bins: int = 9) -> Tensor:
    """HOG of each ViT patch: its ``(patch_size / cell_size)^2`` cells (row-major), each ``C x num_bins`` values.

    Shape: (B, C, H, W) -> (B, (H / patch_size) * (W / patch_size), (patch_size / cell_size)^2 * C * num_bins).
    """
    if patch_size % cell_size:
        raise ValueError(f"patch_size={patch_size} must be a multiple of cell_size={cell_size}")
    if images.shape[-1] % patch_size or images.shape[-2] % patch_size:
        raise ValueError(f"image sides {tuple(images.shape[-2:])} must be multiples of patch_size={patch_size}")
    cells = hog_cells(images, cell_size, num_bins)  # (B, C, K, rows * per, cols * per)
    batch, channels, bins, cell_rows, cell_cols = cells.shape
    per = patch_size // cell_size
    rows, cols = cell_rows // per, cell_cols // per
    grouped = cells.view(batch, channels, bins, rows, per, cols, per)
    # -> (B, rows, cols, cell_row, cell_col, C, K)
    return grouped.permute(0, 3, 5, 4, 6, 1, 2).reshape(batch, rows * cols, per * per * channels * bins)
