"""Denoising autoencoder: its tiny config, the corruptions, and the reconstruction loss against a loop."""

from __future__ import annotations

import pytest
import torch

from ssl_core import build_method
from ssl_core.methods.denoising_autoencoder import corrupt

TINY = {"backbone": "resnet8", "image_size": 16, "decoder_channels": 16}


def test_masking_noise_zeroes_whole_pixels_at_the_configured_rate_and_gaussian_adds_noise() -> None:
    torch.manual_seed(0)
    images = torch.rand(64, 3, 16, 16) + 1.0
    masked = corrupt(images, "masking", 0.3, 0.0)
    zero = masked == 0
    assert torch.equal(zero[:, :1].expand_as(zero), zero)  # all channels of a pixel together
    assert zero[:, 0].float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert torch.equal(masked[~zero], images[~zero])
    noisy = corrupt(images, "gaussian", 0.0, 0.5)
    assert (noisy - images).std().item() == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "salt", 0.1, 0.1)


def test_reconstruction_loss_is_the_mean_squared_error_to_the_clean_image() -> None:
    torch.manual_seed(0)
    method = build_method("denoising_autoencoder", {**TINY, "backbone": "resnet8"}).eval()
    clean, corrupted = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        loss = method.reconstruction_loss(clean, corrupted)
        reconstruction = method.decoder(method.encoder(corrupted))
    total = sum((reconstruction[b, c, h, w].item() - clean[b, c, h, w].item()) ** 2
                for b in range(2) for c in range(3) for h in range(16) for w in range(16))
    assert loss.item() == pytest.approx(total / (2 * 3 * 16 * 16), rel=1e-4)


def test_bad_corruption_names_its_key() -> None:
    with pytest.raises(ValueError, match=r"method\.denoising_autoencoder\.corruption='salt' is not one of"):
        build_method("denoising_autoencoder", {**TINY, "corruption": "salt"})
