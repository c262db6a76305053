"""SimCLR / SimCLRv2: its tiny test config (used by the registry-wide tests) and its fine-tuning trunk."""

from __future__ import annotations

import pytest
import torch

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
