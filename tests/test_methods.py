"""Registry-wide method tests: one step on CPU, gradients, teacher/queue updates, and learning on a toy set."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from ssl_core import available_methods, build_method
from ssl_core.methods import METHODS, MethodConfig, method_config

TINY: dict[str, dict] = {
    "simclr": {"image_size": 16, "projection_hidden_dim": 64, "projection_dim": 32},
    "moco": {"image_size": 16, "projection_hidden_dim": 64, "projection_dim": 32, "queue_size": 64},
    "byol": {"image_size": 16, "projection_hidden_dim": 64, "projection_dim": 32, "prediction_hidden_dim": 64},
    "dino": {"image_size": 16, "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "num_local_crops": 2},
    "barlow_twins": {"image_size": 16, "projection_hidden_dim": 64, "projection_dim": 64},
    "mae": {"image_size": 16, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    "rotation": {"image_size": 16, "hidden_dim": 32},
}


def test_all_required_methods_are_registered() -> None:
    assert {"simclr", "moco", "byol", "dino", "barlow_twins", "mae"} <= set(available_methods())
    assert set(TINY) == set(available_methods()), "every registered method needs a tiny test config"


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
    with pytest.raises(ValueError, match="backbone"):
        build_method("simclr", {"backbone": "resnet1000"})


def _batch(method, size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, 16, 16), dtype=torch.uint8, generator=generator)
    return method.view_generator()(images, generator)


@pytest.mark.parametrize("name", sorted(TINY))
def test_one_step_gives_finite_loss_and_backbone_gradients(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(name, TINY[name])
    assert isinstance(method.config, MethodConfig) and method.feature_dim > 0
    out = method.training_step(_batch(method))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    encoder_grads = [p.grad for p in method.encoder.parameters() if p.requires_grad]
    assert encoder_grads and all(g is not None for g in encoder_grads)
    assert sum(g.abs().sum() for g in encoder_grads) > 0
    trainable = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not trainable, f"trainable parameters without gradient: {trainable[:5]}"


@pytest.mark.parametrize("name", ["moco", "byol", "dino"])
def test_teacher_follows_ema_of_online_network(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(name, TINY[name])
    online, teacher = method.ema_pairs()[0]
    teacher_before = copy.deepcopy(teacher.state_dict())
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method.training_step(_batch(method)).loss.backward()
    optimizer.step()
    method.on_after_optimizer_step(step=0, total_steps=10)
    momentum = method.momentum_at(0, 10)
    assert momentum == pytest.approx(method.config.momentum)
    name_, param = next((n, p) for n, p in online.named_parameters() if p.ndim > 1)
    expected = momentum * teacher_before[name_] + (1 - momentum) * param.detach()
    torch.testing.assert_close(dict(teacher.named_parameters())[name_], expected)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_moco_queue_receives_both_views_keys() -> None:
    torch.manual_seed(0)
    method = build_method("moco", TINY["moco"])
    keys_before = method.queue.keys.clone()
    method.training_step(_batch(method, size=8))
    assert int(method.queue.ptr) == 16
    changed = (method.queue.keys != keys_before).any(dim=1)
    assert changed[:16].all() and not changed[16:].any()
    torch.testing.assert_close(method.queue.keys[:16].norm(dim=1), torch.ones(16))


def test_dino_teacher_temperature_warms_up_and_survives_state_dict() -> None:
    config = dict(TINY["dino"], warmup_teacher_temperature=0.04, teacher_temperature=0.07,
                  teacher_temperature_warmup_fraction=0.5)
    method = build_method("dino", config)
    assert method.teacher_temperature_now == pytest.approx(0.04)
    method.on_after_optimizer_step(step=1, total_steps=10)  # after step 1 -> temperature at step 2 of 5 warmup
    assert method.teacher_temperature_now == pytest.approx(0.04 + 0.03 * 2 / 5)
    restored = build_method("dino", config)
    restored.load_state_dict(method.state_dict())
    assert restored.teacher_temperature_now == pytest.approx(method.teacher_temperature_now)


def _toy_images(count: int = 32) -> torch.Tensor:
    """Two clearly separable classes: bright-left vs bright-top stripes, with pixel noise."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 60, (count, 3, 16, 16), dtype=torch.uint8, generator=generator)
    images[: count // 2, :, :, :6] += 180
    images[count // 2 :, :, :6, :] += 180
    return images


# DINO's loss includes the teacher's entropy, which centering raises early in training; with the teacher and
# its center frozen (momenta 1.0) the loss is the student's cross-entropy to a fixed target and must fall.
LEARNING_OVERRIDES = {"dino": {"momentum": 1.0, "center_momentum": 1.0}}


@pytest.mark.parametrize("name", sorted(TINY))
def test_thirty_steps_lower_the_loss(name: str) -> None:
    torch.manual_seed(0)
    overrides = {"backbone": "resnet8"} if name != "mae" else {}
    method = build_method(name, {**TINY[name], **overrides, **LEARNING_OVERRIDES.get(name, {})})
    views = method.view_generator()
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    images = _toy_images()
    generator = torch.Generator().manual_seed(2)
    losses = []
    for step in range(30):
        out = method.training_step(views(images, generator))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        method.on_after_optimizer_step(step, 30)
        losses.append(out.loss.item())
    # Steps 0-1 are left out: the MoCo queue starts as random unit vectors, easier negatives than real keys.
    assert sum(losses[-5:]) / 5 < sum(losses[2:7]) / 5, losses


def test_method_config_defaults_are_valid_for_every_method() -> None:
    for name in METHODS.names():
        config = method_config(name)
        assert dataclasses.is_dataclass(config)
