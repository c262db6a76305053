"""MAE: its tiny test config and the ViT it requires."""

from __future__ import annotations

import pytest
import torch

from ssl_core.methods import build_method, method_config

TINY = {"image_size": 16, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


def test_a_non_vit_backbone_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match=r"method\.mae\.backbone='resnet8' must be a ViT"):
        method_config("mae", {"backbone": "resnet8"})


def test_views_are_crop_and_flip_only() -> None:
    view = build_method("mae", TINY).view_generator().view_configs["view1"]
    assert view.crop_scale == (0.2, 1.0) and view.jitter_prob == 0.0 and view.grayscale_prob == 0.0


@pytest.mark.parametrize(("mask_ratio", "visible"), [(0.75, 4), (0.5, 8), (0.25, 12)])
def test_mask_ratio_reaches_the_step_and_sets_the_visible_tokens(mask_ratio: float, visible: int) -> None:
    torch.manual_seed(0)
    method = build_method("mae", {**TINY, "mask_ratio": mask_ratio})
    seen: list[tuple[int, ...]] = []
    encode = method.encoder.forward_visible

    def recording(images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        tokens = encode(images, ids_keep)
        seen.append(tuple(tokens.shape))
        return tokens

    method.encoder.forward_visible = recording  # type: ignore[method-assign]
    out = method.training_step({"view1": torch.randn(2, 3, 16, 16)})
    assert torch.isfinite(out.loss)
    assert seen == [(2, 1 + visible, method.encoder.embed_dim)]  # CLS + the visible patches of 16
