import math

import pytest
import torch
from torch import nn

from ssl_core.ema import cosine_momentum, ema_update, frozen_copy


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(200, 100, 0.99) == pytest.approx(1.0)
    step = 30
    expected = 1.0 - (1.0 - 0.996) * (math.cos(math.pi * step / 100) + 1) / 2
    assert cosine_momentum(step, 100, 0.996) == pytest.approx(expected)
    values = [cosine_momentum(s, 100, 0.9, 0.999) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_cosine_momentum_rejects_bad_ranges():
    with pytest.raises(ValueError, match="base_momentum"):
        cosine_momentum(0, 10, 1.5)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_momentum(0, 0, 0.99)
    with pytest.raises(ValueError, match="step"):
        cosine_momentum(-1, 10, 0.99)


def test_ema_update_matches_naive_reference():
    torch.manual_seed(0)
    student, teacher = make_model(), make_model()
    student.train()(torch.randn(8, 3))  # moves BN running stats of the student
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    ema_update(student, teacher, momentum=0.9)
    student_params = dict(student.named_parameters())
    for name, param in teacher.named_parameters():
        flat_teacher, flat_student = before[name].flatten().tolist(), student_params[name].detach().flatten().tolist()
        expected = [0.9 * t + 0.1 * s for t, s in zip(flat_teacher, flat_student)]
        torch.testing.assert_close(param.detach().flatten(), torch.tensor(expected))
    for (name, teacher_buffer), (_, student_buffer) in zip(teacher.named_buffers(), student.named_buffers()):
        assert torch.equal(teacher_buffer, student_buffer), name


def test_ema_update_extremes_and_no_grad():
    student, teacher = make_model(), make_model()
    original = [p.detach().clone() for p in teacher.parameters()]
    ema_update(student, teacher, momentum=1.0)
    for param, old in zip(teacher.parameters(), original):
        assert torch.equal(param, old)
    ema_update(student, teacher, momentum=0.0)
    for param, source in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(param, source)
        assert param.grad is None


def test_ema_update_rejects_mismatched_modules():
    with pytest.raises(ValueError, match="shape"):
        ema_update(nn.Linear(3, 4), nn.Linear(3, 5), 0.9)
    with pytest.raises(ValueError, match="differ"):
        ema_update(nn.Linear(3, 4), nn.Linear(3, 4, bias=False), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(nn.Linear(3, 4), nn.Linear(3, 4), 1.1)


def test_frozen_copy_is_independent_and_frozen():
    student = make_model()
    teacher = frozen_copy(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for param, source in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(param, source) and param.data_ptr() != source.data_ptr()
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))
