"""MAE: its tiny test config and the ViT it requires."""

from __future__ import annotations

import pytest

from ssl_core.methods import build_method, method_config

TINY = {"image_size": 16, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


def test_a_non_vit_backbone_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match=r"method\.mae\.backbone='resnet8' must be a ViT"):
        method_config("mae", {"backbone": "resnet8"})


def test_views_are_crop_and_flip_only() -> None:
    view = build_method("mae", TINY).view_generator().view_configs["view1"]
    assert view.crop_scale == (0.2, 1.0) and view.jitter_prob == 0.0 and view.grayscale_prob == 0.0
