"""MoCo v2: its tiny test config and the queue update of a training step."""

from __future__ import annotations

import torch

from ssl_core.methods import build_method

TINY = {"image_size": 16, "projection_hidden_dim": 64, "projection_dim": 32, "queue_size": 64}


def test_queue_receives_both_views_keys() -> None:
    torch.manual_seed(0)
    method = build_method("moco", TINY)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    keys_before = method.queue.keys.clone()
    method.training_step(method.view_generator()(images, torch.Generator().manual_seed(0)))
    assert int(method.queue.ptr) == 16
    changed = (method.queue.keys != keys_before).any(dim=1)
    assert changed[:16].all() and not changed[16:].any()
    torch.testing.assert_close(method.queue.keys[:16].norm(dim=1), torch.ones(16))
