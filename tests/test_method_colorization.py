"""Colorization: its tiny config, Lab conversion, soft encoding, rebalancing and the loss against loops, and an
encoder that sees lightness only."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_core import build_method
from ssl_core.color import ab_bins, lab_to_rgb, rebalancing_weights, rgb_to_lab, soft_encode
from ssl_core.losses import WeightedSoftCrossEntropy

TINY = {"backbone": "resnet8", "image_size": 16, "prediction_size": 4, "decoder_channels": 16, "bin_size": 20.0}


def _naive_lab(r: float, g: float, b: float) -> tuple[float, float, float]:
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = linear(r), linear(g), linear(b)
    x = (0.412453 * r + 0.357580 * g + 0.180423 * b) / 0.95047
    y = 0.212671 * r + 0.715160 * g + 0.072169 * b
    z = (0.019334 * r + 0.119193 * g + 0.950227 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def test_lab_matches_the_formula_per_pixel_and_round_trips() -> None:
    rgb = torch.rand(2, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    lab = rgb_to_lab(rgb)
    for b, h, w in [(0, 0, 0), (1, 2, 1), (0, 1, 2)]:
        expected = _naive_lab(*rgb[b, :, h, w].tolist())
        assert lab[b, :, h, w].tolist() == pytest.approx(expected, abs=1e-3)
    torch.testing.assert_close(lab_to_rgb(lab), rgb, atol=1e-4, rtol=0)
    red = rgb_to_lab(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)).flatten().tolist()
    assert red == pytest.approx([53.24, 80.09, 67.20], abs=0.05)  # the published sRGB red


def test_soft_encoding_weights_the_five_nearest_bins() -> None:
    bins = ab_bins(10.0)
    ab = torch.tensor([[[[3.0]], [[-16.0]]]])  # one pixel, a=3, b=-16 (no tie among its nearest bins)
    encoded = soft_encode(ab, bins)[0, :, 0, 0]
    distances = [math.dist((3.0, -16.0), tuple(c)) for c in bins.tolist()]
    nearest = sorted(range(len(distances)), key=distances.__getitem__)[:5]
    raw = {q: math.exp(-distances[q] ** 2 / 50.0) for q in nearest}
    for q in range(len(distances)):
        assert encoded[q].item() == pytest.approx(raw.get(q, 0.0) / sum(raw.values()), abs=1e-5)


def test_rebalancing_weights_against_a_loop() -> None:
    bins = torch.tensor([[0.0, 0.0], [10.0, 0.0], [40.0, 0.0]])
    prior = torch.tensor([0.7, 0.2, 0.1])
    weights = rebalancing_weights(prior, bins, mix=0.5, sigma=5.0)
    kernel = [[math.exp(-((bins[i] - bins[j]).norm().item() ** 2) / 50.0) for j in range(3)] for i in range(3)]
    smoothed = [sum(prior[i].item() * kernel[i][j] / sum(kernel[i]) for i in range(3)) for j in range(3)]
    smoothed = [s / sum(smoothed) for s in smoothed]
    raw = [1.0 / (0.5 * s + 0.5 / 3) for s in smoothed]
    scale = sum(s * r for s, r in zip(smoothed, raw))
    assert weights.tolist() == pytest.approx([r / scale for r in raw], rel=1e-5)
    assert weights[0] < weights[1] < weights[2]  # rare colours weigh more


def test_weighted_soft_cross_entropy_against_a_loop() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 2, 3, generator=generator)
    target = torch.softmax(torch.randn(2, 4, 2, 3, generator=generator), dim=1)
    weight = torch.rand(2, 2, 3, generator=generator)
    total = 0.0
    for b in range(2):
        for h in range(2):
            for w in range(3):
                log_norm = math.log(sum(math.exp(logits[b, q, h, w].item()) for q in range(4)))
                ce = -sum(target[b, q, h, w].item() * (logits[b, q, h, w].item() - log_norm) for q in range(4))
                total += weight[b, h, w].item() * ce
    assert WeightedSoftCrossEntropy()(logits, target, weight).item() == pytest.approx(total / 12, rel=1e-5)
    with pytest.raises(ValueError, match="weight must have shape"):
        WeightedSoftCrossEntropy()(logits, target, weight[:, :1])


def test_the_encoder_sees_lightness_only_and_the_prior_is_state() -> None:
    torch.manual_seed(0)
    method = build_method("colorization", {**TINY, "backbone": "resnet8"})
    lab = rgb_to_lab(torch.rand(4, 3, 16, 16) * 0.5 + 0.25)
    recoloured = lab.clone()
    recoloured[:, 1:] = recoloured[:, 1:].flip(0) * 0.5  # another image's colours, same lightness
    mean, std = method.encoder.mean, method.encoder.std
    first, second = ((lab_to_rgb(x).clamp(0, 1) - mean) / std for x in (lab, recoloured))
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(method.encoder(first), method.encoder(second), atol=2e-3, rtol=1e-3)
    method.train()
    prior_before = method.state_dict()["ab_prior"].clone()
    method.training_step({"view1": first}).loss.backward()
    assert not torch.equal(method.state_dict()["ab_prior"], prior_before)


def test_regression_option_and_bad_config() -> None:
    method = build_method("colorization", {**TINY, "loss": "regression"})
    out = method.training_step({"view1": torch.randn(2, 3, 16, 16)})
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match=r"method\.colorization\.prediction_size=32 must not exceed image_size=16"):
        build_method("colorization", {**TINY, "prediction_size": 32})
