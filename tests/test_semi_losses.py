"""ssl_core.semi: every unlabeled loss, target and schedule against a naive reference written here (loops over
rows and classes), plus one property and one bad input each where they have one."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_core.semi import losses
from ssl_core.semi.targets import distribution_alignment, mixup, rampup_weight, sharpen, tsa_threshold


def _softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def _ce_row(logits: list[float], target: list[float]) -> float:
    """-sum_c target_c log softmax(logits)_c, by hand."""
    probs = _softmax_row(logits)
    return -sum(t * math.log(p) for t, p in zip(target, probs))


def _one_hot(index: int, classes: int) -> list[float]:
    return [1.0 if c == index else 0.0 for c in range(classes)]


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weak = torch.randn(12, 5, generator=generator, dtype=torch.float64) * 3.0
    strong = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    return weak, strong


def test_fixmatch_masks_exactly_the_confident_rows_and_averages_over_all(logits) -> None:
    weak, strong = logits
    threshold = 0.7
    loss, mask = losses.fixmatch_loss(weak, strong, threshold)
    expected_mask, total = [], 0.0
    for w, s in zip(weak.tolist(), strong.tolist()):
        probs = _softmax_row(w)
        confident = max(probs) >= threshold
        expected_mask.append(float(confident))
        if confident:
            total += _ce_row(s, _one_hot(probs.index(max(probs)), 5))
    assert mask.tolist() == expected_mask and 0 < sum(expected_mask) < 12  # the fixture has both kinds
    assert loss.item() == pytest.approx(total / 12)
    assert losses.fixmatch_loss(weak, strong, 1.01)[0].item() == 0.0  # nothing confident: no signal


def test_fixmatch_sends_no_gradient_through_the_weak_view(logits) -> None:
    weak, strong = (t.clone().requires_grad_(True) for t in logits)
    losses.fixmatch_loss(weak, strong, 0.0)[0].backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0


def test_pseudo_label_and_entropy(logits) -> None:
    weak, _ = logits
    loss, mask = losses.pseudo_label_loss(weak, 0.5)
    total, count = 0.0, 0
    for row in weak.tolist():
        probs = _softmax_row(row)
        if max(probs) >= 0.5:
            total += _ce_row(row, _one_hot(probs.index(max(probs)), 5))
            count += 1
    assert mask.sum().item() == count and loss.item() == pytest.approx(total / 12)
    entropy = sum(-sum(p * math.log(p) for p in _softmax_row(row)) for row in weak.tolist()) / 12
    assert losses.entropy_loss(weak).item() == pytest.approx(entropy)
    assert losses.entropy_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4))  # uniform: the maximum


def test_consistency_mse_and_mixmatch_unlabeled(logits) -> None:
    weak, strong = logits
    targets = torch.softmax(strong, 1)
    expected = sum(sum((p - t) ** 2 for p, t in zip(_softmax_row(w), tr)) for w, tr in
                   zip(weak.tolist(), targets.tolist())) / 12
    assert losses.consistency_mse(weak, targets).item() == pytest.approx(expected)
    assert losses.mixmatch_unlabeled_loss(weak, targets).item() == pytest.approx(expected / 5)
    assert losses.consistency_mse(weak, torch.softmax(weak, 1)).item() == pytest.approx(0.0, abs=1e-12)


def test_uda_sharpened_soft_target_and_confidence_mask(logits) -> None:
    weak, strong = logits
    temperature, threshold = 0.4, 0.6
    loss, mask = losses.uda_loss(weak, strong, temperature, threshold)
    total, expected_mask = 0.0, []
    for w, s in zip(weak.tolist(), strong.tolist()):
        keep = max(_softmax_row(w)) >= threshold
        expected_mask.append(float(keep))
        if keep:
            total += _ce_row(s, _softmax_row([v / temperature for v in w]))
    assert mask.tolist() == expected_mask and loss.item() == pytest.approx(total / 12)


def test_training_signal_annealing() -> None:
    assert tsa_threshold(0, 100, 10, "linear") == pytest.approx(0.1)  # 1/K at the start
    assert tsa_threshold(100, 100, 10, "linear") == pytest.approx(1.0)
    assert tsa_threshold(50, 100, 10, "log") == pytest.approx((1 - math.exp(-2.5)) * 0.9 + 0.1)
    assert tsa_threshold(50, 100, 10, "exp") == pytest.approx(math.exp(-2.5) * 0.9 + 0.1)
    assert tsa_threshold(3, 100, 10, "none") == 1.0
    with pytest.raises(ValueError, match="tsa schedule 'cosine' is unknown"):
        tsa_threshold(1, 10, 10, "cosine")
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    labels = torch.tensor([0, 1, 2])
    loss, kept = losses.tsa_cross_entropy(logits, labels, 0.6)
    correct = [_softmax_row(r)[label] for r, label in zip(logits.tolist(), labels.tolist())]
    expected_kept = [float(c <= 0.6) for c in correct]
    assert kept.tolist() == expected_kept == [0.0, 1.0, 1.0]
    expected = sum(_ce_row(r, _one_hot(lab, 3)) for r, lab, k in zip(logits.tolist(), labels.tolist(),
                                                                      expected_kept) if k) / 2
    assert loss.item() == pytest.approx(expected)


def test_sharpen_guess_and_alignment() -> None:
    probabilities = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), 1)
    sharpened = sharpen(probabilities, 0.5)
    for row, out in zip(probabilities.tolist(), sharpened.tolist()):
        powered = [p ** 2 for p in row]
        assert out == pytest.approx([p / sum(powered) for p in powered])
    assert (sharpened.argmax(1) == probabilities.argmax(1)).all()
    assert torch.allclose(sharpen(probabilities, 1.0), probabilities)
    with pytest.raises(ValueError, match="temperature=0"):
        sharpen(probabilities, 0)
    stack = torch.stack([probabilities, probabilities.flip(0)])
    assert torch.allclose(losses.guessed_labels(stack, 0.5), sharpen((probabilities + probabilities.flip(0)) / 2, 0.5))
    labeled = torch.tensor([0.1, 0.2, 0.3, 0.4])
    model = torch.tensor([0.4, 0.3, 0.2, 0.1])
    aligned = distribution_alignment(probabilities, labeled, model)
    for row, out in zip(probabilities.tolist(), aligned.tolist()):
        scaled = [p * a / b for p, a, b in zip(row, labeled.tolist(), model.tolist())]
        assert out == pytest.approx([s / sum(scaled) for s in scaled])


def test_mixup_keeps_the_first_input_dominant() -> None:
    a, b = torch.zeros(3, 2), torch.ones(3, 2)
    ta, tb = torch.tensor([[1.0, 0.0]] * 3), torch.tensor([[0.0, 1.0]] * 3)
    lam = torch.tensor([0.2, 0.5, 0.9])
    mixed, targets = mixup(a, ta, b, tb, lam)
    for row, (x, t, value) in enumerate(zip(mixed.tolist(), targets.tolist(), lam.tolist())):
        kept = max(value, 1 - value)  # lambda' = max(lambda, 1 - lambda)
        assert x == pytest.approx([1 - kept] * 2) and t == pytest.approx([kept, 1 - kept])
    assert (targets[:, 0] >= 0.5).all()


def test_rampup_and_certainty() -> None:
    assert rampup_weight(0, 100, 2.0, 0.0) == 2.0
    assert rampup_weight(0, 100, 2.0, 0.5) == pytest.approx(2.0 * math.exp(-5))
    assert rampup_weight(25, 100, 2.0, 0.5) == pytest.approx(2.0 * math.exp(-5 * 0.25))
    assert rampup_weight(80, 100, 2.0, 0.5) == 2.0
    weights = losses.certainty_weights(torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0], [1.0, 3.0, 0.0]]))
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert weights.tolist() == pytest.approx([1.0, 0.0, 1 - entropy / math.log(3)])
