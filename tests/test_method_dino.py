"""DINO: its tiny test config and the teacher temperature schedule."""

from __future__ import annotations

import pytest
import torch

from ssl_core.methods import build_method

TINY = {"image_size": 16, "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "num_local_crops": 2}
LEARNING = {"momentum": 1.0, "center_momentum": 1.0}
"""DINO's loss includes the teacher's entropy, which centering raises early in training; with the teacher and its
center frozen (momenta 1.0) the loss is the student's cross-entropy to a fixed target and must fall."""


def test_teacher_temperature_warms_up_and_survives_state_dict() -> None:
    config = dict(TINY, warmup_teacher_temperature=0.04, teacher_temperature=0.07,
                  teacher_temperature_warmup_fraction=0.5)
    method = build_method("dino", config)
    assert method.teacher_temperature_now == pytest.approx(0.04)
    method.on_after_optimizer_step(step=1, total_steps=10)  # after step 1 -> temperature at step 2 of 5 warmup
    assert method.teacher_temperature_now == pytest.approx(0.04 + 0.03 * 2 / 5)
    restored = build_method("dino", config)
    restored.load_state_dict(method.state_dict())
    assert restored.teacher_temperature_now == pytest.approx(method.teacher_temperature_now)


def test_views_are_two_global_and_the_configured_local_crops() -> None:
    views = build_method("dino", TINY).view_generator().view_configs
    assert list(views) == ["global_0", "global_1", "local_0", "local_1"]
    assert views["local_0"].output_size == 8


def test_dino_on_a_vit_trains_with_local_crops() -> None:
    """The ViT accepts the 8 px local crops (position embeddings interpolated) through steps and teacher updates."""
    torch.manual_seed(0)
    method = build_method("dino", {**TINY, "backbone": "vit_tiny", "encoder_depth": 2})
    assert len(method.encoder.blocks) == 2
    views = method.view_generator()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    teacher_before = method.teacher_encoder.cls_token.clone()
    for step in range(2):
        batch = views(images, generator)
        assert batch["global_0"].shape[-1] == 16 and batch["local_1"].shape[-1] == 8
        out = method.training_step(batch)
        optimizer.zero_grad()
        out.loss.backward()
        assert torch.isfinite(out.loss) and method.encoder.pos_embed.shape[1] == 1 + 16
        assert method.encoder.cls_token.grad.abs().sum() > 0
        optimizer.step()
        method.on_after_optimizer_step(step, 2)
    assert not torch.equal(method.teacher_encoder.cls_token, teacher_before)
    assert method.criterion.gather_distributed


def test_encoder_depth_is_for_a_vit_only() -> None:
    with pytest.raises(ValueError, match=r"method\.dino\.encoder_depth=2 applies to a ViT, not 'resnet18'"):
        build_method("dino", {**TINY, "encoder_depth": 2})
