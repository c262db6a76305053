"""Exemplar (non-parametric, exact softmax over the memory bank): its tiny config and one step against a naive
softmax loop over every bank row, with the bank update."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_core.methods import build_method
from ssl_core.methods.base import ROW_INDEX

TINY = {"image_size": 16, "embedding_dim": 16, "bank_size": 32}


def test_step_is_the_softmax_over_every_bank_row_and_updates_the_bank() -> None:
    torch.manual_seed(0)
    method = build_method("exemplar", {**TINY, "backbone": "resnet8", "temperature": 0.2, "bank_momentum": 0.0})
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    views = {**method.view_generator()(images, torch.Generator().manual_seed(2)), ROW_INDEX: torch.tensor([7, 0, 30])}
    bank_before = method.bank.features.clone()
    with torch.no_grad():
        features = F.normalize(method.embedding(method.encoder(views["view1"])), dim=1)
    out = method.training_step(views)
    expected = 0.0
    for b, row in enumerate([7, 0, 30]):
        scores = [float(features[b] @ bank_before[j]) / 0.2 for j in range(32)]
        expected -= scores[row] - math.log(sum(math.exp(s) for s in scores))
    assert float(out.loss.detach()) == pytest.approx(expected / 3, rel=1e-5)
    torch.testing.assert_close(method.bank.features[[7, 0, 30]], features)  # momentum 0: overwritten
    assert torch.equal(method.bank.features[1:7], bank_before[1:7])
