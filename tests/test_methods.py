"""Registry-wide method tests: every registered method, with the tiny config its own test module
(``tests/test_method_<name>.py``) declares as ``TINY``: one step on CPU, gradients, views and their
normalisation, the fine-tuning trunk, teacher updates, and learning on a toy set."""

from __future__ import annotations

import copy
import dataclasses
import importlib

import pytest
import torch

from ssl_core import available_methods, build_method
from ssl_core.methods import METHODS, MethodConfig, method_config
from ssl_core.methods.base import ROW_INDEX

METHOD_NAMES = available_methods()


def tiny(name: str, *, learning: bool = False, **overrides: object) -> dict:
    """``TINY`` of the method's own test module (which every method must have), with its ``LEARNING`` overrides
    (if it has any) for the learning test."""
    try:
        module = importlib.import_module(f"test_method_{name}")
    except ModuleNotFoundError:
        pytest.fail(f"method {name!r} needs its own test module tests/test_method_{name}.py with a TINY config")
    learning_overrides = getattr(module, "LEARNING", {}) if learning else {}
    return {**module.TINY, **learning_overrides, **overrides}


def test_all_required_methods_are_registered() -> None:
    assert {"simclr", "moco", "byol", "dino", "barlow_twins", "mae", "rotation",  # the first seven
            "jigsaw", "relative_location", "counting", "colorization", "context_encoder",  # issue 14: pretext
            "denoising_autoencoder", "exemplar", "npid", "pirl", "pcl",  # issue 14: memory banks
            "ijepa", "maskfeat", "dinov2"} <= set(METHOD_NAMES)  # issue 15: ViT methods


def test_unknown_method_lists_known_names() -> None:
    with pytest.raises(KeyError, match="simclr"):
        build_method("simclr_v9")


def test_out_of_range_value_names_field_and_range() -> None:
    with pytest.raises(ValueError, match=r"method\.moco\.queue_size=3 is out of range \[16, 1048576\]"):
        build_method("moco", {"queue_size": 3})
    with pytest.raises(ValueError, match=r"method\.simclr\.temperature"):
        build_method("simclr", {"temperature": -1.0})
    with pytest.raises(ValueError, match=r"unknown key method\.simclr\.temprature"):
        build_method("simclr", {"temprature": 0.1})
    with pytest.raises(ValueError, match=r"method\.simclr\.backbone='resnet1000' is unknown; known: .*resnet18"):
        build_method("simclr", {"backbone": "resnet1000"})


def test_a_config_is_valid_by_construction_and_frozen() -> None:
    config_cls = METHODS.get("simclr").Config
    with pytest.raises(ValueError, match=r"SimCLRConfig\.temperature=0\.0 is out of range"):
        config_cls(temperature=0.0)
    config = config_cls()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.temperature = 0.3  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"SimCLRConfig\.temperature=20\.0 is out of range"):
        dataclasses.replace(config, temperature=20.0)


def _batch(method, size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, 16, 16), dtype=torch.uint8, generator=generator)
    return method.view_generator()(images, generator)


def _step_views(method, size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A step's input as the pipeline gives it: the views plus each image's training row (memory-bank methods
    use it, the others ignore it)."""
    return {**_batch(method, size, seed), ROW_INDEX: torch.arange(size)}


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_one_step_gives_finite_loss_and_backbone_gradients(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(name, tiny(name))
    assert isinstance(method.config, MethodConfig) and method.feature_dim > 0
    out = method.training_step(_step_views(method))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(value.ndim == 0 and not value.requires_grad for value in out.logs.values())
    out.loss.backward()
    encoder_grads = [p.grad for p in method.encoder.parameters() if p.requires_grad]
    assert encoder_grads and all(g is not None for g in encoder_grads)
    assert sum(g.abs().sum() for g in encoder_grads) > 0
    trainable = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not trainable, f"trainable parameters without gradient: {trainable[:5]}"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_views_are_finite_and_end_with_the_methods_normalisation(name: str) -> None:
    method = build_method(name, tiny(name))
    views = _batch(method, size=2)
    assert views and all(torch.isfinite(v).all() and v.shape[:2] == (2, 3) for v in views.values())
    normalization = method.normalization()
    assert all((cfg.mean, cfg.std) == (normalization.mean, normalization.std)
               for cfg in method.view_generator().view_configs.values())


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_finetune_head_offers_exactly_the_blocks_the_config_declares(name: str) -> None:
    method = build_method(name, tiny(name))
    available = method.config.max_finetune_head_layers()
    assert len(method.projection_blocks()) == available
    features = torch.rand(4, method.feature_dim)
    for layers in range(available + 1):
        head = method.finetune_head(layers).eval()
        assert len(head) == layers and head(features).ndim == 2
    with pytest.raises(ValueError, match=rf"head_layers={available + 1} is out of range: method '{name}'"):
        method.finetune_head(available + 1)


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if build_method(n, tiny(n)).ema_pairs()])
def test_teacher_follows_ema_of_online_network(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(name, tiny(name))
    online, teacher = method.ema_pairs()[0]
    teacher_before = copy.deepcopy(teacher.state_dict())
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method.training_step(_step_views(method)).loss.backward()
    optimizer.step()
    method.on_after_optimizer_step(step=0, total_steps=10)
    momentum = method.momentum_at(0, 10)
    assert momentum == pytest.approx(method.config.momentum)
    name_, param = next((n, p) for n, p in online.named_parameters() if p.ndim > 1)
    expected = momentum * teacher_before[name_] + (1 - momentum) * param.detach()
    torch.testing.assert_close(dict(teacher.named_parameters())[name_], expected)
    assert all(not p.requires_grad for p in teacher.parameters())


def _toy_images(count: int = 32) -> torch.Tensor:
    """Two clearly separable classes: bright-left vs bright-top stripes, with pixel noise."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 60, (count, 3, 16, 16), dtype=torch.uint8, generator=generator)
    images[: count // 2, :, :, :6] += 180
    images[count // 2 :, :, :6, :] += 180
    return images


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_thirty_steps_lower_the_loss(name: str) -> None:
    torch.manual_seed(0)
    overrides = {} if METHODS.get(name).Config().backbone.startswith("vit_") else {"backbone": "resnet8"}
    method = build_method(name, tiny(name, learning=True, **overrides))
    views = method.view_generator()
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    images = _toy_images()
    generator = torch.Generator().manual_seed(2)
    losses = []
    for step in range(30):
        out = method.training_step({**views(images, generator), ROW_INDEX: torch.arange(len(images))})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        method.on_after_optimizer_step(step, 30)
        losses.append(out.loss.item())
    # Steps 0-1 are left out: the MoCo queue starts as random unit vectors, easier negatives than real keys.
    assert sum(losses[-5:]) / 5 < sum(losses[2:7]) / 5, losses


def test_method_config_defaults_are_valid_for_every_method() -> None:
    for name in METHOD_NAMES:
        config = method_config(name)
        assert dataclasses.is_dataclass(config) and config.max_finetune_head_layers() >= 0
