"""sRGB <-> CIE Lab (D65 white), batched, and the quantised ab space of colorization (Zhang et al. 2016).

``rgb_to_lab``: sRGB in [0, 1] -> linear RGB (inverse sRGB gamma) -> XYZ (sRGB matrix, D65) -> Lab with
``L in [0, 100]``, ``a, b`` roughly in ``[-110, 110]`` (the CIE 1976 formulas, ``f(t) = t^(1/3)`` above
``(6/29)^3``, linear below). ``lab_to_rgb`` inverts it (values outside the sRGB gamut come out outside [0, 1]).

``ab_bins``: the centres of the ``bin_size`` grid over ab that hold a colour of the sRGB gamut at some lightness
(257 bins for ``bin_size=10``; the paper's 313 are the cells that ImageNet's pixels fall in). ``soft_encode``:
each pixel's ab as weights on its nearest bins (Gaussian in the distance). ``rebalancing_weights``: the class
weights that undo the bias of natural images towards desaturated colours.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ssl_core.augment import host_to_device

D65_WHITE = (0.95047, 1.0, 1.08883)
RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_DELTA = 6.0 / 29.0


def _matrix(values: tuple, like: Tensor) -> Tensor:
    return host_to_device(torch.tensor(values, dtype=like.dtype), like.device)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """Shape: (B, 3, H, W) sRGB in [0, 1] -> (B, 3, H, W) Lab (L in [0, 100]), float32 even under autocast."""
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) RGB, got {tuple(rgb.shape)}")
    with torch.autocast(rgb.device.type, enabled=False):
        return _rgb_to_lab(rgb)


def _rgb_to_lab(rgb: Tensor) -> Tensor:
    rgb = rgb.float().clamp(0.0, 1.0)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", _matrix(RGB_TO_XYZ, linear), linear)
    xyz = xyz / _matrix(D65_WHITE, xyz).view(1, 3, 1, 1)
    f = torch.where(xyz > _DELTA**3, xyz.clamp(min=1e-12).pow(1.0 / 3.0), xyz / (3 * _DELTA**2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """Shape: (B, 3, H, W) Lab -> (B, 3, H, W) sRGB (not clamped: out-of-gamut colours leave [0, 1]), float32 even
    under autocast."""
    if lab.ndim != 4 or lab.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) Lab, got {tuple(lab.shape)}")
    with torch.autocast(lab.device.type, enabled=False):
        return _lab_to_rgb(lab)


def _lab_to_rgb(lab: Tensor) -> Tensor:
    lightness, a, b = lab.float().unbind(1)
    fy = (lightness + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=1)
    xyz = torch.where(f > _DELTA, f.pow(3), 3 * _DELTA**2 * (f - 4.0 / 29.0))
    xyz = xyz * _matrix(D65_WHITE, xyz).view(1, 3, 1, 1)
    linear = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_matrix(RGB_TO_XYZ, xyz)), xyz)
    return torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=1e-12).pow(1 / 2.4) - 0.055, 12.92 * linear)


@functools.lru_cache(maxsize=4)
def _ab_bins(bin_size: float) -> Tensor:
    half = 110.0
    steps = torch.arange(-half, half + 1e-6, bin_size)
    a, b = torch.meshgrid(steps, steps, indexing="ij")
    centres = torch.stack([a.flatten(), b.flatten()], dim=1)  # (G, 2)
    offsets = torch.linspace(-0.5, 0.5, 5) * bin_size
    sub_a, sub_b = torch.meshgrid(offsets, offsets, indexing="ij")
    points = centres.unsqueeze(1) + torch.stack([sub_a.flatten(), sub_b.flatten()], dim=1)  # (G, 25, 2)
    lightness = torch.arange(0.0, 100.0 + 1e-6, 2.0)
    lab = torch.cat([
        lightness.view(-1, 1, 1, 1).expand(-1, *points.shape[:2], 1),
        points.unsqueeze(0).expand(lightness.numel(), -1, -1, -1),
    ], dim=3)  # (L, G, 25, 3)
    rgb = lab_to_rgb(lab.permute(0, 3, 1, 2))  # (L, 3, G, 25)
    in_gamut = ((rgb >= 0.0) & (rgb <= 1.0)).all(1).any(0).any(1)
    return centres[in_gamut]


def ab_bins(bin_size: float = 10.0) -> Tensor:
    """Centres ``(Q, 2)`` of the ab grid cells (side ``bin_size``, centres over [-110, 110]^2) that hold an in-gamut
    colour (tested on a 5x5 grid of points per cell) at some L in 0, 2, ..., 100."""
    return _ab_bins(float(bin_size)).clone()


def soft_encode(ab: Tensor, bins: Tensor, neighbours: int = 5, sigma: float = 5.0) -> Tensor:
    """Soft-encode ab values on their ``neighbours`` nearest bins, weights ``exp(-d^2 / (2 sigma^2))`` normalised
    to sum to 1 (Zhang et al. 2016, Sec. 2.1). Shape: ab (B, 2, H, W), bins (Q, 2) -> (B, Q, H, W)."""
    batch, _, height, width = ab.shape
    points = ab.float().permute(0, 2, 3, 1).reshape(-1, 2)
    distance = torch.cdist(points, bins.float().to(ab.device))  # (P, Q)
    nearest, index = distance.topk(min(neighbours, bins.shape[0]), dim=1, largest=False)
    weights = torch.softmax(-nearest.pow(2) / (2 * sigma**2), dim=1)
    encoded = torch.zeros_like(distance).scatter_(1, index, weights)
    return encoded.view(batch, height, width, -1).permute(0, 3, 1, 2)


def rebalancing_weights(prior: Tensor, bins: Tensor, mix: float = 0.5, sigma: float = 5.0) -> Tensor:
    """Class weights ``w ∝ ((1 - mix) p~ + mix / Q)^-1`` normalised so that ``sum_q p~_q w_q = 1``, where ``p~`` is
    ``prior`` (the empirical bin distribution) smoothed by a Gaussian of std ``sigma`` over the bin centres
    (Zhang et al. 2016, eq. 4, ``lambda = mix = 0.5``). Shape: prior (Q,), bins (Q, 2) -> (Q,)."""
    kernel = torch.exp(-torch.cdist(bins.float(), bins.float()).pow(2) / (2 * sigma**2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    smoothed = prior.float() @ kernel
    smoothed = smoothed / smoothed.sum()
    weights = 1.0 / ((1.0 - mix) * smoothed + mix / prior.numel())
    return weights / (smoothed * weights).sum()
