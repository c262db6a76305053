"""I-JEPA: its tiny test config, the block masks, the loss against a naive loop, and the step against a by-hand
computation of the same predictor and EMA target."""

from __future__ import annotations

import pytest
import torch

from ssl_core.losses import FeaturePredictionLoss
from ssl_core.methods import build_method, method_config
from ssl_core.methods.ijepa import IJEPAConfig, block_size, sample_blocks

TINY = {"image_size": 16, "encoder_depth": 1, "predictor_dim": 32, "predictor_depth": 1, "predictor_heads": 2}


def test_block_size_follows_scale_and_aspect_ratio() -> None:
    assert block_size(0.25, 1.0, 8) == (4, 4)
    assert block_size(0.125, 2.0, 8) == (4, 2)  # area 8, height / width = 2
    assert block_size(0.001, 1.0, 8) == (1, 1)  # never empty
    assert block_size(1.0, 4.0, 4) == (4, 2)  # clamped to the grid


@pytest.mark.parametrize("grid_size", [4, 8])
def test_blocks_are_rectangles_and_the_context_avoids_every_target(grid_size: int) -> None:
    config = IJEPAConfig(image_size=16, num_targets=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        context_ids, target_ids = sample_blocks(config, 5, grid_size, generator)
        assert target_ids.shape[:2] == (5, 3) and context_ids.shape[0] == 5 and context_ids.shape[1] >= 1
        for b in range(5):
            context = context_ids[b].tolist()
            assert context == sorted(set(context))
            for m in range(3):
                ids = target_ids[b, m].tolist()
                rows = {i // grid_size for i in ids}
                cols = {i % grid_size for i in ids}
                # a full rectangle of patches, row-major
                assert sorted(ids) == ids and len(ids) == len(rows) * len(cols)
                assert rows == set(range(min(rows), max(rows) + 1)) and cols == set(range(min(cols), max(cols) + 1))
                assert not set(ids) & set(context)


def test_impossible_blocks_raise_naming_the_fields() -> None:
    config = IJEPAConfig(image_size=16, num_targets=8, target_scale_min=0.9, target_scale_max=1.0,
                         context_scale_min=0.05, context_scale_max=0.05)
    with pytest.raises(ValueError, match="target_scale_max=1.0.*context_scale_min=0.05"):
        sample_blocks(config, 2, 4, torch.Generator().manual_seed(0))


def test_config_checks_ranges_and_cross_field_rules() -> None:
    with pytest.raises(ValueError, match=r"method\.ijepa\.target_scale_min=0\.3 must be <= target_scale_max=0\.2"):
        method_config("ijepa", {"target_scale_min": 0.3})
    with pytest.raises(ValueError, match=r"method\.ijepa\.num_targets=9 is out of range \[1, 8\]"):
        method_config("ijepa", {"num_targets": 9})
    with pytest.raises(ValueError, match=r"method\.ijepa\.backbone='resnet8' must be a ViT"):
        method_config("ijepa", {"backbone": "resnet8"})
    with pytest.raises(ValueError, match=r"method\.ijepa\.predictor_dim=30 must be divisible by 4"):
        method_config("ijepa", {"predictor_dim": 30, "predictor_heads": 3})


def test_feature_prediction_loss_matches_a_naive_loop() -> None:
    torch.manual_seed(0)
    prediction, target = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64) * 3 + 1
    total = 0.0
    for b in range(2):
        for n in range(3):
            values = target[b, n].tolist()
            mean = sum(values) / 5
            variance = sum((v - mean) ** 2 for v in values) / 5
            for d in range(5):
                normalised = (values[d] - mean) / (variance + 1e-5) ** 0.5
                total += (prediction[b, n, d].item() - normalised) ** 2
    assert FeaturePredictionLoss()(prediction, target).item() == pytest.approx(total / 30, rel=1e-9)
    assert FeaturePredictionLoss(normalize_target=False)(target, target).item() == 0.0
    with pytest.raises(ValueError, match="target must have the same shape"):
        FeaturePredictionLoss()(prediction, target[:, :2])


def test_step_predicts_the_ema_target_features_of_the_target_blocks() -> None:
    torch.manual_seed(0)
    method = build_method("ijepa", TINY)
    assert method.encoder.pool == "mean" and method.view_generator().view_configs["view1"].hflip_prob == 0.0
    images = torch.randn(3, 3, 16, 16)
    torch.manual_seed(5)
    out = method.training_step({"view1": images})
    torch.manual_seed(5)  # the same masks again
    context_ids, target_ids = sample_blocks(method.config, 3, method.encoder.grid_size)
    assert out.logs["context_patches"] == context_ids.shape[1]
    with torch.no_grad():
        context = method.encoder.forward_visible(images, context_ids)[:, 1:]
        prediction = method.predictor(context, context_ids, target_ids)
        features = method.target_encoder.forward_tokens(images)[:, 1:]
        expected = 0.0
        for b in range(3):
            for m in range(target_ids.shape[1]):
                for k, patch in enumerate(target_ids[b, m].tolist()):
                    target = torch.nn.functional.layer_norm(features[b, patch], (features.shape[-1],))
                    expected += (prediction[b, m, k] - target).pow(2).mean().item()
    assert out.loss.item() == pytest.approx(expected / target_ids[..., 0].numel() / target_ids.shape[-1], rel=1e-4)


def test_every_point_of_the_tune_space_is_a_valid_config() -> None:
    from tune_spaces import ijepa as space_module

    space = space_module.space(train_rows=1000)
    assert {"momentum", "target_scale_max", "context_scale_min"} <= set(space)
    for _ in range(50):
        method_config("ijepa", {name: domain.sample() for name, domain in space.items()})
