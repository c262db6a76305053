"""The batched strong augmentation (RandAugment-like + cutout) of ``ssl_core.augment``."""

from __future__ import annotations

import pytest
import torch

from ssl_core.augment import STRONG_OPS, _strong_op, cutout, strong_augment

MAGNITUDE_OPS = [name for name in STRONG_OPS if name not in ("identity", "autocontrast")]


def _images(batch: int = 4, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(0)).float() / 255


@pytest.mark.parametrize("name", MAGNITUDE_OPS)
def test_every_op_at_strength_zero_is_the_identity(name: str) -> None:
    images = _images()
    out = _strong_op(name, images, torch.zeros(4), torch.ones(4))
    assert torch.allclose(out, images, atol=1e-5)


def test_ops_against_naive_formulas() -> None:
    images = _images(2)
    strength, sign = torch.tensor([1.0, 0.5]), torch.tensor([1.0, -1.0])
    solarized = _strong_op("solarize", images, strength, sign)
    for b, threshold in enumerate([0.0, 0.5]):
        for value, out in zip(images[b].flatten().tolist(), solarized[b].flatten().tolist()):
            assert out == pytest.approx(1 - value if value > threshold else value)
    posterized = _strong_op("posterize", images, strength, sign)
    for b, bits in enumerate([4, 6]):  # 8 - round(4 strength) bits kept
        for value, out in zip(images[b].flatten().tolist(), posterized[b].flatten().tolist()):
            assert round(out * 255) == (round(value * 255) >> (8 - bits)) << (8 - bits)
    brightness = _strong_op("brightness", images, strength, sign)
    assert torch.allclose(brightness[1], (images[1] * (1 - 0.45)).clamp(0, 1))
    shifted = _strong_op("translate_x", images, torch.tensor([0.25 / 0.3, 0.0]), torch.ones(2))
    # +25% of an 8-pixel side: every output pixel reads the input 2 pixels to its right; grey fills the edge
    assert torch.allclose(shifted[0, :, :, :6], images[0, :, :, 2:], atol=1e-5)
    assert torch.allclose(shifted[0, :, :, 6:], torch.full_like(shifted[0, :, :, 6:], 0.5), atol=1e-5)


def test_cutout_fills_exactly_the_square() -> None:
    images = torch.zeros(2, 3, 8, 8)
    out = cutout(images, torch.tensor([[0.5, 0.5], [0.0, 0.0]]), 0.5)
    for b, (cx, cy) in enumerate([(0.5, 0.5), (0.0, 0.0)]):
        for y in range(8):
            for x in range(8):
                inside = abs((x + 0.5) / 8 - cx) <= 0.25 and abs((y + 0.5) / 8 - cy) <= 0.25
                assert out[b, 0, y, x].item() == (0.5 if inside else 0.0)


def test_strong_augment_is_seeded_per_sample_and_in_range() -> None:
    images = _images(16)
    first = strong_augment(images, 2, 1.0, 0.5, torch.Generator().manual_seed(3))
    again = strong_augment(images, 2, 1.0, 0.5, torch.Generator().manual_seed(3))
    other = strong_augment(images, 2, 1.0, 0.5, torch.Generator().manual_seed(4))
    assert first.shape == images.shape and torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 1
    changed = (first - images).abs().flatten(1).amax(1) > 0
    assert changed.all()  # cutout alone changes every image
    assert torch.equal(strong_augment(images, 0, 1.0, 0.0, torch.Generator().manual_seed(3)), images)
    with pytest.raises(ValueError, match="magnitude=2"):
        strong_augment(images, 2, 2.0, 0.5)
