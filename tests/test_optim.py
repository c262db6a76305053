import math

import pytest
import torch
from torch import nn

from ssl_core.optim import LARS, param_groups, warmup_cosine


def naive_lars_step(param, grad, buffer, lr, momentum, weight_decay, trust_coefficient, eps):
    """Reference LARS step written out element by element."""
    param_norm = math.sqrt(sum(p * p for p in param))
    grad_norm = math.sqrt(sum(g * g for g in grad))
    if param_norm > 0 and grad_norm > 0:
        trust_ratio = trust_coefficient * param_norm / (grad_norm + weight_decay * param_norm + eps)
    else:
        trust_ratio = 1.0
    new_buffer = [momentum * b + (g + weight_decay * p) * trust_ratio for p, g, b in zip(param, grad, buffer)]
    new_param = [p - lr * b for p, b in zip(param, new_buffer)]
    return new_param, new_buffer


def test_lars_matches_hand_computed_update():
    # p = (3, 4): ||p|| = 5; g = (0.6, 0.8): ||g|| = 1; wd = 0.1, eta = 0.01, lr = 2:
    # trust = 0.01 * 5 / (1 + 0.5) = 1/30; d = (0.9, 1.2) / 30 = (0.03, 0.04); p - 2 d = (2.94, 3.92)
    param = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = LARS([param], lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01, eps=0.0)
    param.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.tensor([2.94, 3.92], dtype=torch.float64))

    # second step: the momentum buffer (0.03, 0.04) carries over
    expected, _ = naive_lars_step([2.94, 3.92], [0.6, 0.8], [0.03, 0.04], 2.0, 0.9, 0.1, 0.01, 0.0)
    param.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.tensor(expected, dtype=torch.float64))


def test_lars_matches_naive_reference_over_steps():
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(5, generator=generator, dtype=torch.float64))
    optimizer = LARS([param], lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=1e-3, eps=1e-8)
    reference, buffer = param.detach().tolist(), [0.0] * 5
    for _ in range(4):
        grad = torch.randn(5, generator=generator, dtype=torch.float64)
        param.grad = grad.clone()
        optimizer.step()
        reference, buffer = naive_lars_step(reference, grad.tolist(), buffer, 0.5, 0.9, 1e-2, 1e-3, 1e-8)
        torch.testing.assert_close(param.detach(), torch.tensor(reference, dtype=torch.float64))


def test_lars_trust_ratio_is_one_for_zero_param():
    param = nn.Parameter(torch.zeros(2))
    optimizer = LARS([param], lr=1.0, momentum=0.0, weight_decay=0.5)
    param.grad = torch.tensor([1.0, -2.0])
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.tensor([-1.0, 2.0]))


def test_lars_excluded_group_is_plain_sgd_momentum():
    excluded = nn.Parameter(torch.tensor([3.0, 4.0]))
    reference = nn.Parameter(torch.tensor([3.0, 4.0]))
    lars = LARS([{"params": [excluded], "weight_decay": 0.0, "lars_exclude": True}], lr=0.1, momentum=0.9,
                weight_decay=0.5)
    sgd = torch.optim.SGD([reference], lr=0.1, momentum=0.9)
    for grad in ([0.6, 0.8], [-1.0, 2.0], [0.5, 0.5]):
        excluded.grad = torch.tensor(grad)
        reference.grad = torch.tensor(grad)
        lars.step()
        sgd.step()
        torch.testing.assert_close(excluded.detach(), reference.detach())
    # hand-computed first two steps: buf1 = g1, buf2 = 0.9 g1 + g2
    expected = torch.tensor([3.0, 4.0]) - 0.1 * torch.tensor([0.6, 0.8]) - 0.1 * torch.tensor([0.54 - 1.0, 0.72 + 2.0])
    expected = expected - 0.1 * (0.9 * torch.tensor([0.54 - 1.0, 0.72 + 2.0]) + torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(excluded.detach(), expected)


def test_lars_skips_params_without_grad_and_rejects_bad_args():
    param = nn.Parameter(torch.ones(3))
    LARS([param], lr=1.0).step()
    torch.testing.assert_close(param.detach(), torch.ones(3))
    with pytest.raises(ValueError, match="lr"):
        LARS([param], lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        LARS([param], lr=1.0, momentum=1.5)


def test_param_groups_split_weights_from_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model[3].bias.requires_grad_(False)
    decayed, not_decayed = param_groups(model, weight_decay=1e-4)
    assert decayed["weight_decay"] == 1e-4
    assert not decayed.get("lars_exclude", False)
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert not_decayed["weight_decay"] == 0.0 and not_decayed["lars_exclude"] is True
    assert {id(p) for p in not_decayed["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    # the groups plug into LARS and into a stock optimizer
    LARS(param_groups(model, 1e-4), lr=0.1)
    torch.optim.SGD(param_groups(model, 1e-4), lr=0.1)


def test_warmup_cosine_values():
    kwargs = {"total_steps": 110, "warmup_steps": 10, "base_value": 1.0, "final_value": 0.1}
    assert warmup_cosine(0, **kwargs) == 0.0
    assert warmup_cosine(5, **kwargs) == pytest.approx(0.5)
    assert warmup_cosine(10, **kwargs) == pytest.approx(1.0)
    assert warmup_cosine(60, **kwargs) == pytest.approx(0.55)  # halfway through the cosine: (base + final) / 2
    assert warmup_cosine(110, **kwargs) == pytest.approx(0.1)
    assert warmup_cosine(500, **kwargs) == pytest.approx(0.1)
    values = [warmup_cosine(s, **kwargs) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_cosine_without_warmup_and_bad_args():
    assert warmup_cosine(0, 100, 0, 2.0) == pytest.approx(2.0)
    assert warmup_cosine(100, 100, 0, 2.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, 10, 20, 1.0)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(0, 0, 0, 1.0)
