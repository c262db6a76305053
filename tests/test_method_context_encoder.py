"""Context encoder: its tiny config, the region loss against a loop, and the method's loss on the centre only."""

from __future__ import annotations

import pytest
import torch

from ssl_core import build_method
from ssl_core.losses import RegionReconstructionLoss

TINY = {"backbone": "resnet8", "image_size": 16, "decoder_channels": 16}


def _naive_region_mse(prediction, target, mask) -> float:
    total, count = 0.0, 0
    batch, channels, height, width = prediction.shape
    for b in range(batch):
        for h in range(height):
            for w in range(width):
                if mask[min(b, mask.shape[0] - 1), 0, h, w] > 0:
                    for c in range(channels):
                        total += (prediction[b, c, h, w].item() - target[b, c, h, w].item()) ** 2
                        count += 1
    return total / count


def test_region_loss_against_a_loop_and_blind_outside_the_region() -> None:
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 3, 5, 5, generator=generator), torch.randn(2, 3, 5, 5, generator=generator)
    mask = (torch.rand(2, 1, 5, 5, generator=generator) > 0.5).float()
    loss = RegionReconstructionLoss()
    assert loss(prediction, target, mask).item() == pytest.approx(_naive_region_mse(prediction, target, mask), rel=1e-5)
    assert loss(torch.where(mask.bool(), prediction, prediction + 100.0), target, mask).item() == pytest.approx(
        loss(prediction, target, mask).item(), rel=1e-6)
    with pytest.raises(ValueError, match="mask must have shape"):
        loss(prediction, target, mask[:, :, :4])


def test_loss_reconstructs_the_hidden_centre_from_the_context() -> None:
    torch.manual_seed(0)
    method = build_method("context_encoder", {**TINY, "backbone": "resnet8"}).eval()
    images = torch.randn(2, 3, 16, 16)
    masked = images.clone()
    masked[:, :, 4:12, 4:12] = 0.0  # mask_fraction 0.5 of 16 px: the central 8x8
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1.0
    with torch.no_grad():
        loss = method.training_step({"view1": images}).loss
        expected = _naive_region_mse(method.decoder(method.encoder(masked)), images, mask)
        # The centre of the input is hidden: changing it does not change the reconstruction.
        other = images.clone()
        other[:, :, 4:12, 4:12] = torch.randn(2, 3, 8, 8)
        same_input = method.decoder(method.encoder(other * (1 - mask)))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(same_input, method.decoder(method.encoder(masked)))


def test_bad_mask_fraction_names_its_key() -> None:
    with pytest.raises(ValueError, match=r"method\.context_encoder\.mask_fraction=0\.95 is out of range"):
        build_method("context_encoder", {**TINY, "mask_fraction": 0.95})
