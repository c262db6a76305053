"""Recipes that fit the data (``ssl_core.recipes``, applied by ``pipelines.config``): what a config leaves out comes
from the method's recipe at ``data.image_size``; what it sets wins; the stem follows the image size."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipelines.config import config_from_mapping
from ssl_core import build_method
from ssl_core.methods import METHODS, available_methods
from ssl_core.recipes import recipe


def load(image_size: int, method: dict | None = None, pretrain: dict | None = None):
    return config_from_mapping({"data": {"image_size": image_size}, "method": method or {"name": "simclr"},
                                "pretrain": pretrain or {}, "finetune": {"head_layers": 0}})


def test_small_images_get_the_small_recipe_and_large_ones_the_imagenet_recipe() -> None:
    small = load(32)
    assert (small.method.config.backbone, small.method.config.small_images, small.method.config.temperature) == \
        ("resnet20", True, 0.2)
    assert (small.pretrain.optimizer, small.pretrain.lr, small.pretrain.lr_scaling, small.pretrain.weight_decay) == \
        ("adamw", 0.004, "none", 1e-4)
    large = load(224)
    assert (large.method.config.backbone, large.method.config.small_images, large.method.config.temperature) == \
        ("resnet18", False, 0.5)
    assert (large.pretrain.optimizer, large.pretrain.lr, large.pretrain.weight_decay) == ("lars", 0.3, 1e-6)


def test_what_the_config_sets_wins_and_groups_are_not_mixed() -> None:
    cfg = load(32, {"name": "simclr", "config": {"backbone": "resnet8", "temperature": 0.5}}, {"lr": 0.1})
    config = cfg.method.config
    assert (config.backbone, config.temperature, config.small_images) == ("resnet8", 0.5, True)
    # A named backbone keeps its own (default) head sizes; an lr without an optimizer keeps the section's defaults.
    assert config.projection_hidden_dim == type(config)().projection_hidden_dim
    assert (cfg.pretrain.optimizer, cfg.pretrain.lr) == ("lars", 0.1)


def test_the_stem_follows_the_image_size_even_for_a_named_backbone() -> None:
    config = load(224, {"name": "simclr", "config": {"backbone": "resnet18", "projection_hidden_dim": 16,
                                                     "projection_dim": 8}}).method.config
    assert config.small_images is False
    encoder = build_method("simclr", config).encoder.eval()
    with torch.no_grad():
        features = encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(
            encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(torch.zeros(1, 3, 224, 224)))))))))
    assert tuple(features.shape[-2:]) == (7, 7)  # ImageNet stem: /32; the CIFAR stem would leave 28x28 (16x)


def test_a_vit_only_method_keeps_its_vit() -> None:
    assert load(32, {"name": "mae"}).method.config.backbone.startswith("vit")


@pytest.mark.parametrize("image_size", [32, 224])
def test_every_method_loads_with_its_recipe(image_size: int) -> None:
    for name in available_methods():
        config = load(image_size, {"name": name}).method.config
        assert config.small_images is (image_size < 64), name
        default_backbone = {f.name: f.default for f in dataclasses.fields(METHODS.get(name).Config)}["backbone"]
        chosen = recipe(name, image_size, default_backbone=default_backbone)
        for field, value in chosen.objective.items():
            assert getattr(config, field) == value, (name, field)
