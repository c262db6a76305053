"""SimCLR / SimCLRv2: its tiny test config (used by the registry-wide tests), its fine-tuning trunk, and
SimCLRv2's memory (``queue_size``): NT-Xent with queued negatives against a naive loop, the queue's keys."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_core.losses import NTXentLoss
from ssl_core.methods import build_method

TINY = {"image_size": 16, "projection_hidden_dim": 64, "projection_dim": 32}


def test_finetune_head_is_the_first_projection_blocks_shared_not_copied() -> None:
    method = build_method("simclr", {**TINY, "backbone": "resnet8", "projection_layers": 3})
    head = method.finetune_head(1)
    assert len(head) == 1 and head[0] is method.projection_head.layers[0]
    assert head(torch.rand(4, method.feature_dim)).shape == (4, 64)
    assert len(method.finetune_head(0)) == 0 and len(method.finetune_head(3)) == 3
    with pytest.raises(ValueError, match=r"head_layers=4 is out of range: method 'simclr' has 3 projection-head"):
        method.finetune_head(4)


def naive_nt_xent_with_queue(z1: list[list[float]], z2: list[list[float]], queue: list[list[float]],
                             temperature: float) -> float:
    """Every anchor: its other view against all other views of the batch and every queued key."""
    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    views = [unit(v) for v in z1 + z2]
    keys = [unit(v) for v in queue]
    n = len(z1)
    total = 0.0
    for a, anchor in enumerate(views):
        positive = (a + n) % (2 * n)
        others = [views[b] for b in range(2 * n) if b != a] + keys
        denominator = sum(math.exp(sum(x * y for x, y in zip(anchor, o)) / temperature) for o in others)
        total -= sum(x * y for x, y in zip(anchor, views[positive])) / temperature - math.log(denominator)
    return total / (2 * n)


def test_nt_xent_with_queued_negatives_matches_naive_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    z1, z2, queue = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((3, 4), (3, 4), (5, 4)))
    loss = NTXentLoss(temperature=0.3)(z1, z2, queue)
    assert float(loss) == pytest.approx(naive_nt_xent_with_queue(z1.tolist(), z2.tolist(), queue.tolist(), 0.3))
    with pytest.raises(ValueError, match=r"negatives must have shape \(queue_size, 4\)"):
        NTXentLoss()(z1, z2, queue[:, :3])


def test_queue_option_adds_a_momentum_network_whose_keys_fill_the_queue() -> None:
    plain = build_method("simclr", {**TINY, "backbone": "resnet8"})
    assert plain.queue is None and plain.ema_pairs() == []
    torch.manual_seed(0)
    method = build_method("simclr", {**TINY, "backbone": "resnet8", "queue_size": 32})
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    views = method.view_generator()(images, torch.Generator().manual_seed(2))
    queue_before = method.queue.keys.clone()
    with torch.no_grad():
        keys = method.key_projection_head(method.key_encoder(torch.cat([views["view1"], views["view2"]])))
    out = method.training_step(views)
    z1, z2 = method.projection_head(method.encoder(torch.cat([views["view1"], views["view2"]]))).chunk(2)
    # The projection head ends in batch norm, computed per batch: the re-run above reproduces the step's outputs.
    expected = naive_nt_xent_with_queue(z1.tolist(), z2.tolist(), queue_before.tolist(), method.config.temperature)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(method.queue.keys[:8], torch.nn.functional.normalize(keys, dim=1))
    assert int(method.queue.ptr) == 8 and len(method.ema_pairs()) == 2
    out.loss.backward()
    assert all(p.grad is None for p in method.key_encoder.parameters())
