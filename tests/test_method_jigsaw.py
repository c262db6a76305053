"""Jigsaw: its tiny config, the puzzle loss against a loop over tiles, and the config's refusals."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_core import build_method
from ssl_core.tiles import maximal_hamming_permutations

TINY = {"backbone": "resnet8", "image_size": 16, "tile_gap": 1, "tile_jitter": 0, "num_permutations": 8,
        "tile_dim": 16, "hidden_dim": 32}


def test_puzzle_loss_matches_a_loop_over_tiles_and_permutations() -> None:
    torch.manual_seed(0)
    method = build_method("jigsaw", {**TINY, "backbone": "resnet8"}).eval()
    images = torch.randn(3, 3, 16, 16)
    index = torch.tensor([5, 0, 7])
    with torch.no_grad():
        loss, logits = method.puzzle_loss(images, index)
        perms = method.permutations
        total = 0.0
        for b in range(3):
            embeddings = []
            for position in range(9):
                row, col = divmod(int(perms[index[b], position]), 3)
                # 16 px: cells of 5 px from the corner; a 4 px tile sits 1 px into its cell (gap 1, no jitter).
                tile = images[b, :, row * 5 + 1 : row * 5 + 5, col * 5 + 1 : col * 5 + 5]
                mean = tile.mean(dim=(1, 2), keepdim=True)
                std = ((tile - mean) ** 2).mean(dim=(1, 2), keepdim=True).add(1e-5).sqrt()
                embeddings.append(method.tile_fc(method.encoder(((tile - mean) / std)[None]))[0])
            row_logits = method.classifier(torch.cat(embeddings)[None])[0]
            torch.testing.assert_close(logits[b], row_logits, rtol=1e-4, atol=1e-5)
            total += -(float(row_logits[index[b]]) - math.log(sum(math.exp(v) for v in row_logits.tolist())))
    assert loss.item() == pytest.approx(total / 3, rel=1e-4)


def test_permutation_classes_are_the_maximal_hamming_set_of_the_config() -> None:
    method = build_method("jigsaw", {**TINY, "permutation_seed": 3})
    assert torch.equal(method.permutations, maximal_hamming_permutations(8, 3, seed=3))
    assert "permutations" not in method.state_dict()  # derived from the config, not state


def test_an_image_too_small_for_the_grid_is_refused_at_config_load_naming_the_keys() -> None:
    with pytest.raises(ValueError, match=r"method\.jigsaw\.image_size/tile_gap/tile_jitter=\(16, 2, 1\) leave tiles "
                                         r"of 1 px"):
        build_method("jigsaw", {"image_size": 16})
    with pytest.raises(ValueError, match=r"method\.jigsaw\.backbone='vit_tiny' must be a convolutional backbone"):
        build_method("jigsaw", {"backbone": "vit_tiny"})
    with pytest.raises(ValueError, match=r"method\.jigsaw\.num_permutations=1 is out of range"):
        build_method("jigsaw", {**TINY, "num_permutations": 1})
