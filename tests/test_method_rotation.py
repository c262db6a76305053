"""Rotation prediction: its tiny test config and the rotation of a batch."""

from __future__ import annotations

import torch

from ssl_core.methods.rotation import rotate_batch

TINY = {"image_size": 16, "hidden_dim": 32}


def test_rotate_batch_turns_each_image_by_its_own_quarter_turns() -> None:
    images = torch.arange(2 * 4).float().view(2, 1, 2, 2)
    rotated = rotate_batch(images, torch.tensor([0, 1]))
    assert torch.equal(rotated[0], images[0])
    assert torch.equal(rotated[1], torch.rot90(images[1], 1, dims=(1, 2)))
