"""PIRL: its tiny config, one step against a naive reference (lambda-mix of two NCE terms over the memory bank),
the jigsaw branch's shape, and a grid that does not fit the image raising at config load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_core.methods import build_method
from ssl_core.methods.base import ROW_INDEX

TINY = {"image_size": 16, "embedding_dim": 16, "bank_size": 32, "num_negatives": 8, "tile_gap": 1, "tile_jitter": 0}


def naive_nce(positive: list[float], negatives: list[list[float]], temperature: float, n: int) -> float:
    """NCE with Z estimated from these very scores (the first step's), one term at a time."""
    scores = positive + [s for row in negatives for s in row]
    z = n * sum(math.exp(s / temperature) for s in scores) / len(scores)
    noise = len(negatives[0]) / n
    total = 0.0
    for b, s_pos in enumerate(positive):
        p = math.exp(s_pos / temperature) / z
        total -= math.log(p / (p + noise))
        for s_neg in negatives[b]:
            p = math.exp(s_neg / temperature) / z
            total -= math.log(1 - p / (p + noise))
    return total / len(positive)


def test_step_mixes_the_jigsaw_and_image_terms_against_the_bank() -> None:
    torch.manual_seed(0)
    method = build_method("pirl", {**TINY, "backbone": "resnet8", "loss_weight": 0.7})
    rows = [3, 17, 30, 0]
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    views = {**method.view_generator()(images, torch.Generator().manual_seed(2)), ROW_INDEX: torch.tensor(rows)}
    bank = method.bank.features.clone()
    torch.manual_seed(5)  # the step draws the tile order, then the negatives, from the global generator
    with torch.no_grad():
        image = F.normalize(method.image_embedding(method.encoder(views["view1"])), dim=1)
        jigsaw = method.jigsaw_features(views["view2"])
    negative_rows = torch.randint(0, 32, (8,)).tolist()
    torch.manual_seed(5)
    out = method.training_step(views)
    assert jigsaw.shape == (4, 16)

    def term(features: torch.Tensor) -> float:
        positive = [float(features[b] @ bank[r]) for b, r in enumerate(rows)]
        negatives = [[float(features[b] @ bank[j]) for j in negative_rows] for b in range(4)]
        return naive_nce(positive, negatives, 0.07, 32)

    expected = 0.7 * term(jigsaw) + 0.3 * term(image)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-4)
    for b, r in enumerate(rows):  # the bank follows the image branch
        torch.testing.assert_close(method.bank.features[r], F.normalize(0.5 * bank[r] + 0.5 * image[b], dim=0))


def test_image_too_small_for_the_grid_raises_at_config_load_naming_the_keys() -> None:
    with pytest.raises(ValueError, match=r"method\.pirl\.image_size/tile_gap/tile_jitter=\(16, 2, 1\) leave tiles"):
        build_method("pirl", {**TINY, "tile_gap": 2, "tile_jitter": 1})
