"""Relative patch location: its tiny config, the pairs and the loss against loops, the chromatic guards."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_core import build_method
from ssl_core.methods.relative_location import apply_chromatic_guard

TINY = {"backbone": "resnet8", "image_size": 16, "tile_gap": 1, "tile_jitter": 0, "patch_dim": 16, "hidden_dim": 32}


def _patch(image: torch.Tensor, cell: int) -> torch.Tensor:
    row, col = divmod(cell, 3)
    return image[:, row * 5 + 1 : row * 5 + 5, col * 5 + 1 : col * 5 + 5]  # 16 px, gap 1: 4 px patches


def test_pairs_and_loss_match_a_loop_over_the_eight_neighbours() -> None:
    torch.manual_seed(0)
    method = build_method("relative_location", {**TINY, "backbone": "resnet8"}).eval()
    images = torch.randn(8, 3, 16, 16)
    position = torch.arange(8)
    neighbour_cells = [0, 1, 2, 3, 5, 6, 7, 8]  # row-major around the centre cell 4
    with torch.no_grad():
        centre, neighbour = method.pairs(images, position)
        logits = method.pair_logits(centre, neighbour)
        total = 0.0
        for b in range(8):
            assert torch.equal(centre[b], _patch(images[b], 4))
            assert torch.equal(neighbour[b], _patch(images[b], neighbour_cells[b]))
            first = method.patch_fc(method.encoder(_patch(images[b], 4)[None]))
            second = method.patch_fc(method.encoder(_patch(images[b], neighbour_cells[b])[None]))
            row = method.classifier(torch.cat([first, second], dim=1))[0]
            torch.testing.assert_close(logits[b], row, rtol=1e-4, atol=1e-5)
            total += math.log(sum(math.exp(v) for v in row.tolist())) - float(row[b])
    loss = torch.nn.functional.cross_entropy(logits, position)
    assert loss.item() == pytest.approx(total / 8, rel=1e-4)


def test_chromatic_guards_remove_colour() -> None:
    patches = torch.rand(5, 3, 4, 4)
    gray = apply_chromatic_guard(patches, "grayscale", 0.0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    torch.testing.assert_close(gray[:, 0], 0.299 * patches[:, 0] + 0.587 * patches[:, 1] + 0.114 * patches[:, 2])
    dropped = apply_chromatic_guard(patches, "drop_channels", 0.01)
    assert ((dropped == patches).all(-1).all(-1).sum(1) == 1).all()  # exactly one channel kept per patch
    assert torch.equal(apply_chromatic_guard(patches, "none", 0.0), patches)


def test_an_image_too_small_for_the_grid_is_refused_at_config_load_naming_the_keys() -> None:
    with pytest.raises(ValueError, match=r"method\.relative_location\.image_size/tile_gap/tile_jitter=\(24, 3, 1\) "
                                         r"leave tiles of 3 px"):
        build_method("relative_location", {"image_size": 24, "tile_gap": 3})
    with pytest.raises(ValueError, match=r"method\.relative_location\.chromatic_guard='blur' is not one of"):
        build_method("relative_location", {**TINY, "chromatic_guard": "blur"})
