"""DINOv2-style training: its tiny test config, Sinkhorn-Knopp, KoLeo and iBOT's patch loss against naive loops,
the patch masks, and a step on a ViT with local crops under both centerings."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_core.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from ssl_core.methods import build_method, method_config
from ssl_core.methods.dinov2 import random_patch_mask

TINY = {"image_size": 16, "encoder_depth": 1, "out_dim": 32, "patch_out_dim": 16, "hidden_dim": 32,
        "bottleneck_dim": 16, "num_local_crops": 1}
LEARNING = {"momentum": 1.0, "center_momentum": 1.0, "koleo_loss_weight": 0.0,
            "teacher_temperature_warmup_fraction": 0.0}
"""As DINO's: with the teacher, its centers and its temperature fixed the loss is a cross-entropy to a fixed target
and must fall (KoLeo, an entropy estimate of the batch, is left out of that check)."""


def _naive_sinkhorn(logits: list[list[float]], temperature: float, iterations: int,
                    weights: list[float]) -> list[list[float]]:
    """SwAV's algorithm with plain lists: Q[k][b] = w_b exp(l[b][k] / T), normalised to sum 1, then alternately
    rows to 1/K and columns to 1/B; returns B * Q^T."""
    batch, prototypes = len(logits), len(logits[0])
    q = [[weights[b] * math.exp(logits[b][k] / temperature) for b in range(batch)] for k in range(prototypes)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    count = sum(weights)
    for _ in range(iterations):
        q = [[v / sum(row) / prototypes for v in row] for row in q]
        column = [sum(q[k][b] for k in range(prototypes)) for b in range(batch)]
        q = [[q[k][b] / column[b] / count if column[b] > 0 else 0.0 for b in range(batch)] for k in range(prototypes)]
    return [[count * q[k][b] for k in range(prototypes)] for b in range(batch)]


def test_sinkhorn_matches_a_naive_loop_and_equipartitions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 4, dtype=torch.float64)
    probs = sinkhorn_knopp(logits, 0.5, iterations=3)
    expected = torch.tensor(_naive_sinkhorn(logits.tolist(), 0.5, 3, [1.0] * 6), dtype=torch.float32)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(6))  # each sample a distribution
    many = sinkhorn_knopp(logits, 0.5, iterations=200)
    torch.testing.assert_close(many.sum(dim=0), torch.full((4,), 6 / 4), rtol=1e-4, atol=1e-4)  # equal usage
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    masked = sinkhorn_knopp(logits, 0.5, iterations=3, weights=weights)
    expected = torch.tensor(_naive_sinkhorn(logits.tolist(), 0.5, 3, weights.tolist()), dtype=torch.float32)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(masked[1], torch.zeros(4))
    with pytest.raises(ValueError, match="teacher_logits must have shape"):
        sinkhorn_knopp(torch.randn(2, 3, 4), 0.1)


def test_koleo_matches_a_naive_nearest_neighbour_loop() -> None:
    torch.manual_seed(1)
    features = torch.randn(5, 3, dtype=torch.float64)
    unit = [f / f.norm() for f in features]
    total = 0.0
    for i in range(5):
        distance = min((unit[i] - unit[j] + 1e-8).norm().item() for j in range(5) if j != i)
        total += -math.log(distance + 1e-8)
    assert KoLeoLoss()(features).item() == pytest.approx(total / 5, rel=1e-5)
    spread = KoLeoLoss()(torch.eye(3))
    clustered = KoLeoLoss()(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 1.0, 0.0]]))
    assert clustered > spread  # near-duplicates are penalised
    with pytest.raises(ValueError, match="batch >= 2"):
        KoLeoLoss()(torch.randn(1, 3))


def test_ibot_patch_loss_matches_a_naive_loop_and_updates_its_center() -> None:
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    criterion = IBOTPatchLoss(4, student_temperature=0.2, teacher_temperature=0.05, center_momentum=0.8).double()
    criterion.center.fill_(0.1)
    loss = criterion(student, teacher, mask)
    per_image = []
    for b in range(2):
        values = []
        for n in range(3):
            if not mask[b, n]:
                continue
            t = [(v - 0.1) / 0.05 for v in teacher[b, n].tolist()]
            p = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
            s = [v / 0.2 for v in student[b, n].tolist()]
            log_q = [v - math.log(sum(math.exp(u) for u in s)) for v in s]
            values.append(-sum(pi * qi for pi, qi in zip(p, log_q)))
        per_image.append(sum(values) / len(values))
    assert loss.item() == pytest.approx(sum(per_image) / 2, rel=1e-9)
    masked_mean = (teacher[0, 0] + teacher[0, 2] + teacher[1, 1]) / 3
    torch.testing.assert_close(criterion.center[0], 0.8 * 0.1 + 0.2 * masked_mean)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        criterion(student, teacher, mask.double())


def test_sinkhorn_centering_leaves_the_center_and_uses_equipartitioned_targets() -> None:
    torch.manual_seed(3)
    student = [torch.randn(4, 6) for _ in range(3)]
    teacher = [torch.randn(4, 6) for _ in range(2)]
    criterion = DINOLoss(6, centering="sinkhorn")
    loss = criterion(student, teacher, teacher_temperature=0.1)
    probs = sinkhorn_knopp(torch.cat(teacher), 0.1).split(4)
    expected = sum(-(probs[i] * torch.log_softmax(student[j] / 0.1, dim=-1)).sum(-1).mean()
                   for i in range(2) for j in range(3) if i != j) / 4
    torch.testing.assert_close(loss, expected)
    assert torch.equal(criterion.center, torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"centering must be one of \['center', 'sinkhorn'\]"):
        DINOLoss(6, centering="mean")


def test_patch_mask_ratios_stay_in_range() -> None:
    mask = random_patch_mask(200, 16, 0.1, 0.5, generator=torch.Generator().manual_seed(0))
    counts = mask.sum(dim=1)
    assert mask.dtype == torch.bool and counts.min() >= 2 and counts.max() <= 8  # round(0.1 * 16) .. round(0.5 * 16)
    assert len(set(counts.tolist())) > 3
    assert random_patch_mask(3, 16, 0.0, 0.0).sum(dim=1).tolist() == [1, 1, 1]  # at least one masked patch


def test_config_rules() -> None:
    with pytest.raises(ValueError, match=r"method\.dinov2\.mask_ratio_min=0\.6 must be <= mask_ratio_max=0\.5"):
        method_config("dinov2", {"mask_ratio_min": 0.6})
    with pytest.raises(ValueError, match=r"method\.dinov2\.centering='mean' is not one of \['center', 'sinkhorn'\]"):
        method_config("dinov2", {"centering": "mean"})


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_step_on_a_vit_with_local_crops_logs_its_three_losses(centering: str) -> None:
    torch.manual_seed(0)
    method = build_method("dinov2", {**TINY, "centering": centering})
    views = method.view_generator()(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8),
                                    torch.Generator().manual_seed(0))
    assert views["local_0"].shape == (4, 3, 8, 8)
    out = method.training_step(views)
    logs = out.logs
    expected = logs["dino_loss"] + logs["ibot_loss"] + 0.1 * logs["koleo_loss"]
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0
    moved = centering == "center"
    assert bool(method.ibot_loss.center.abs().sum() > 0) == moved
    assert bool(method.dino_loss.center.abs().sum() > 0) == moved


def test_every_point_of_the_tune_space_is_a_valid_config() -> None:
    from tune_spaces import dinov2 as space_module

    space = space_module.space(train_rows=1000)
    assert {"momentum", "teacher_temperature", "mask_ratio_max"} <= set(space)
    for _ in range(50):
        method_config("dinov2", {name: domain.sample() for name, domain in space.items()})
