"""Counting: its tiny config, the counting loss against a loop, the method's loss against quadrants by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_core import build_method
from ssl_core.losses import CountingLoss

TINY = {"backbone": "resnet8", "image_size": 16, "count_dim": 16, "margin": 1.0}


def _naive_counting_loss(whole, tile_sum, other_whole, margin: float) -> float:
    total = 0.0
    for b in range(whole.shape[0]):
        positive = sum((float(whole[b, d]) - float(tile_sum[b, d])) ** 2 for d in range(whole.shape[1]))
        negative = sum((float(other_whole[b, d]) - float(tile_sum[b, d])) ** 2 for d in range(whole.shape[1]))
        total += positive + max(0.0, margin - negative)
    return total / whole.shape[0]


def test_counting_loss_matches_a_loop_and_is_zero_for_exact_counts_far_from_others() -> None:
    generator = torch.Generator().manual_seed(0)
    whole, tile_sum, other = (torch.rand(6, 5, generator=generator) for _ in range(3))
    for margin in (0.3, 10.0):
        expected = _naive_counting_loss(whole, tile_sum, other, margin)
        assert CountingLoss(margin)(whole, tile_sum, other).item() == pytest.approx(expected, rel=1e-5)
    assert CountingLoss(1.0)(whole, whole, whole + 5.0).item() == 0.0
    assert CountingLoss(1.0)(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 3)).item() == 1.0  # all-zero pays
    with pytest.raises(ValueError, match="tile_sum must have the same shape"):
        CountingLoss()(whole, tile_sum[:, :3], other)
    with pytest.raises(ValueError, match="margin"):
        CountingLoss(0.0)


def test_method_loss_sums_the_counts_of_the_four_quadrants_against_the_downsampled_image() -> None:
    torch.manual_seed(0)
    method = build_method("counting", {**TINY, "backbone": "resnet8"}).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        loss, _ = method.counting_loss(images, "area")
        phi = [method.count_head(method.encoder(x)) for x in (
            images[:, :, :8, :8], images[:, :, :8, 8:], images[:, :, 8:, :8], images[:, :, 8:, 8:],
            F.avg_pool2d(images, 2),
        )]
    tile_sum = phi[0] + phi[1] + phi[2] + phi[3]
    other = torch.stack([phi[4][(b - 1) % 3] for b in range(3)])  # the previous image, cyclically
    expected = _naive_counting_loss(phi[4], tile_sum, other, TINY["margin"])
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_bad_inputs_raise() -> None:
    method = build_method("counting", TINY)
    with pytest.raises(ValueError, match="at least 2 images"):
        method.counting_loss(torch.rand(1, 3, 16, 16), "area")
    with pytest.raises(ValueError, match=r"method\.counting\.backbone='vit_tiny' must be a convolutional"):
        build_method("counting", {"backbone": "vit_tiny"})
