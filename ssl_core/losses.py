"""Self-supervised and distillation losses as plain ``nn.Module`` s.

Every loss returns a scalar tensor, takes its scalars in the constructor (defaults are the papers' values)
and validates constructor arguments and input shapes with ``ValueError`` messages that name the argument.
Losses never detach their inputs: stop-gradients (BYOL's target, DINO's teacher, MoCo's keys, the
distillation teacher) are the calling method's job, which computes those tensors under ``torch.no_grad``.

``gather_distributed=True`` computes the loss over the global batch, all-gathered with gradients through
``ssl_core.distributed.gather_with_grad``; without an initialised process group it is the single-process loss.
Each rank then holds the same global loss value and ``gather_with_grad`` sums the gradient of every rank's
copy into the local slice, so DDP's gradient averaging yields the gradient of the global loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_core.distributed import concat_all_gather, gather_with_grad, rank, world_size

_BATCH_NORM_EPS = 1e-5  # BatchNorm1d(affine=False) default, as in Barlow Twins' reference code
_PIXEL_NORM_EPS = 1e-6  # MAE's per-patch target normalisation


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_pair(first_name: str, first: torch.Tensor, second_name: str, second: torch.Tensor) -> None:
    """Both tensors must be (batch, dim) with equal shapes."""
    if first.ndim != 2:
        raise ValueError(f"{first_name} must have shape (batch, dim), got {tuple(first.shape)}")
    if second.shape != first.shape:
        raise ValueError(
            f"{second_name} must have the same shape as {first_name} {tuple(first.shape)}, got {tuple(second.shape)}"
        )


class NTXentLoss(nn.Module):
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.

    With ``z`` the L2-normalised rows of ``[z1; z2]`` (``2N`` vectors, ``N`` = global batch) and ``k(a)`` the
    other view of anchor ``a``::

        loss_a = -log( exp(z_a . z_k(a) / T) / sum_{b != a} exp(z_a . z_b / T) )
        loss   = mean over the 2B local anchors

    With ``gather_distributed`` the candidates ``b`` range over the views of every rank and the positive of
    local sample ``i`` sits at global index ``rank * B + i``. Default ``temperature=0.5`` is SimCLR's CIFAR-10
    setting.

    Shape: z1 (batch, dim), z2 (batch, dim) -> scalar.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False) -> None:
        super().__init__()
        _check_positive("temperature", temperature)
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        _check_pair("z1", z1, "z2", z2)
        batch_size = z1.shape[0]
        z1 = F.normalize(z1, dim=1)
        z2 = F.normalize(z2, dim=1)
        if self.gather_distributed:
            z1_all, z2_all = gather_with_grad(z1), gather_with_grad(z2)
            offset = rank() * batch_size
        else:
            z1_all, z2_all, offset = z1, z2, 0
        positives = offset + torch.arange(batch_size, device=z1.device)
        # A view is never its own negative: mask (local i, global offset + i) in the same-view blocks.
        self_mask = torch.zeros(batch_size, z1_all.shape[0], dtype=torch.bool, device=z1.device)
        self_mask[torch.arange(batch_size, device=z1.device), positives] = True

        logits_12 = z1 @ z2_all.T / self.temperature
        logits_11 = (z1 @ z1_all.T / self.temperature).masked_fill(self_mask, float("-inf"))
        logits_21 = z2 @ z1_all.T / self.temperature
        logits_22 = (z2 @ z2_all.T / self.temperature).masked_fill(self_mask, float("-inf"))
        # Positives are in the first block of each row, at column offset + i.
        logits = torch.cat(
            [torch.cat([logits_12, logits_11], dim=1), torch.cat([logits_21, logits_22], dim=1)], dim=0
        )
        return F.cross_entropy(logits, positives.repeat(2))


class InfoNCEQueueLoss(nn.Module):
    """InfoNCE with a queue of negatives, as in MoCo.

    He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020; temperature
    0.2 from Chen et al., "Improved Baselines with Momentum Contrastive Learning" (MoCo v2), 2020.

    With ``q``, ``k`` and the queue rows ``n_j`` L2-normalised inside::

        loss = mean_b -log( exp(q_b . k_b / T) / (exp(q_b . k_b / T) + sum_j exp(q_b . n_j / T)) )

    The keys and the queue are expected to carry no gradient (momentum encoder under ``no_grad``).

    Shape: query (batch, dim), key (batch, dim), queue (queue_size, dim) -> scalar.
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        _check_positive("temperature", temperature)
        self.temperature = temperature

    def forward(self, query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        _check_pair("query", query, "key", key)
        if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
            raise ValueError(
                f"queue must have shape (queue_size, {query.shape[1]}) to match query, got {tuple(queue.shape)}"
            )
        query = F.normalize(query, dim=1)
        key = F.normalize(key, dim=1)
        queue = F.normalize(queue, dim=1)
        positive_logits = (query * key).sum(dim=1, keepdim=True)
        negative_logits = query @ queue.T
        logits = torch.cat([positive_logits, negative_logits], dim=1) / self.temperature
        labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
        return F.cross_entropy(logits, labels)


class BYOLLoss(nn.Module):
    """BYOL's normalised mean squared error between prediction and target.

    Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning", NeurIPS 2020::

        loss = mean_b || p_b/||p_b|| - t_b/||t_b|| ||^2 = mean_b (2 - 2 cos(p_b, t_b))

    Symmetric in its arguments; the target is expected to carry no gradient (EMA teacher under ``no_grad``),
    and the method sums the loss over both view orders.

    Shape: prediction (batch, dim), target (batch, dim) -> scalar.
    """

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair("prediction", prediction, "target", target)
        cosine = (F.normalize(prediction, dim=1) * F.normalize(target, dim=1)).sum(dim=1)
        return (2 - 2 * cosine).mean()


class DINOLoss(nn.Module):
    """DINO's cross-entropy between a centred, sharpened teacher and the student, over crop pairs.

    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021::

        P_t^i = softmax((t_i - center) / teacher_temperature)      one per global crop i
        P_s^j = softmax(s_j / student_temperature)                 one per crop j (global crops first)
        loss  = mean over pairs (i, j), i != j, of mean_b -sum_k P_t^i[b, k] log P_s^j[b, k]

    After the loss is computed, the center (buffer, shape (1, out_dim), zero at start) is updated under
    ``no_grad`` from the batch mean of all teacher outputs (averaged over ranks when ``gather_distributed``
    and a process group is initialised; equal per-rank batch sizes assumed, as in DINO)::

        center = center_momentum * center + (1 - center_momentum) * batch_center

    ``teacher_temperature`` passed to ``forward`` overrides the constructor value for that call (DINO warms it
    up from 0.04 by a schedule). The student's crop list must start with the global crops in the teacher's order.

    Shape: student_out [n_crops x (batch, out_dim)], teacher_out [n_global x (batch, out_dim)] -> scalar.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        center_momentum: float = 0.9,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim!r}")
        _check_positive("student_temperature", student_temperature)
        _check_positive("teacher_temperature", teacher_temperature)
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum!r}")
        self.out_dim = out_dim
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.center_momentum = center_momentum
        self.gather_distributed = gather_distributed
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student_out: Sequence[torch.Tensor],
        teacher_out: Sequence[torch.Tensor],
        teacher_temperature: float | None = None,
    ) -> torch.Tensor:
        temperature = self.teacher_temperature if teacher_temperature is None else teacher_temperature
        _check_positive("teacher_temperature", temperature)
        self._check_crops(student_out, teacher_out)

        teacher_probs = [F.softmax((t - self.center) / temperature, dim=-1) for t in teacher_out]
        student_log_probs = [F.log_softmax(s / self.student_temperature, dim=-1) for s in student_out]
        total = student_out[0].new_zeros(())
        num_pairs = 0
        for i, probs in enumerate(teacher_probs):
            for j, log_probs in enumerate(student_log_probs):
                if i == j:
                    continue
                total = total + (-probs * log_probs).sum(dim=-1).mean()
                num_pairs += 1
        loss = total / num_pairs
        self.update_center(teacher_out)
        return loss

    def _check_crops(self, student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor]) -> None:
        if len(teacher_out) == 0:
            raise ValueError("teacher_out must hold at least one crop")
        if len(student_out) == 0:
            raise ValueError("student_out must hold at least one crop")
        if len(student_out) == 1 and len(teacher_out) == 1:
            raise ValueError("student_out and teacher_out hold one crop each: no pair with different crops")
        batch_size = teacher_out[0].shape[0]
        for name, crops in (("teacher_out", teacher_out), ("student_out", student_out)):
            for index, crop in enumerate(crops):
                if crop.ndim != 2 or crop.shape != (batch_size, self.out_dim):
                    raise ValueError(
                        f"{name}[{index}] must have shape ({batch_size}, {self.out_dim}), got {tuple(crop.shape)}"
                    )

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[torch.Tensor]) -> None:
        """EMA of the teacher outputs' batch mean (over crops, samples and, if gathering, ranks)."""
        teacher = torch.cat(list(teacher_out), dim=0)
        batch_sum = teacher.sum(dim=0, keepdim=True)
        count = teacher.shape[0]
        if self.gather_distributed:
            batch_sum = concat_all_gather(batch_sum).sum(dim=0, keepdim=True)
            count *= world_size()
        batch_center = (batch_sum / count).to(self.center.dtype)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins' redundancy-reduction loss on the cross-correlation matrix.

    Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021.
    Each dimension is normalised over the (global, if gathering) batch of ``N`` samples with the biased
    standard deviation, ``zn = (z - mean) / sqrt(var + 1e-5)``, then::

        c    = z1n^T z2n / N                                  (dim, dim)
        loss = sum_i (1 - c_ii)^2 + lambda_offdiag * sum_{i != j} c_ij^2

    Zero when both views are the same decorrelated, standardised features. Default ``lambda_offdiag=5e-3``.

    Shape: z1 (batch, dim), z2 (batch, dim), batch >= 2 -> scalar.
    """

    def __init__(self, lambda_offdiag: float = 5e-3, gather_distributed: bool = False) -> None:
        super().__init__()
        if not lambda_offdiag >= 0:
            raise ValueError(f"lambda_offdiag must be >= 0, got {lambda_offdiag!r}")
        self.lambda_offdiag = lambda_offdiag
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        _check_pair("z1", z1, "z2", z2)
        if self.gather_distributed:
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        if z1.shape[0] < 2:
            raise ValueError(f"z1 must hold at least 2 samples to normalise over the batch, got {z1.shape[0]}")
        correlation = _standardize(z1).T @ _standardize(z2) / z1.shape[0]
        diagonal = torch.diagonal(correlation)
        on_diagonal = (1 - diagonal).pow(2).sum()
        off_diagonal = correlation.pow(2).sum() - diagonal.pow(2).sum()
        return on_diagonal + self.lambda_offdiag * off_diagonal


def _standardize(z: torch.Tensor) -> torch.Tensor:
    """Per-dimension batch normalisation without affine parameters (biased variance)."""
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + _BATCH_NORM_EPS)


class MaskedReconstructionLoss(nn.Module):
    """MAE's mean squared error on masked patches.

    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022. With ``normalize_pixels`` the
    target is normalised per patch, ``t = (t - mean(t)) / sqrt(var(t) + 1e-6)`` (unbiased variance over the
    patch's values, as in MAE's code), then::

        loss = sum_{b,n} mask[b, n] * mean_p (prediction[b, n, p] - t[b, n, p])^2 / sum_{b,n} mask[b, n]

    ``mask`` is 1 for masked (reconstructed) patches and 0 for visible ones; an all-zero mask raises.

    Shape: prediction (batch, num_patches, patch_dim), target same, mask (batch, num_patches) -> scalar.
    """

    def __init__(self, normalize_pixels: bool = True) -> None:
        super().__init__()
        self.normalize_pixels = normalize_pixels

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if prediction.ndim != 3:
            raise ValueError(
                f"prediction must have shape (batch, num_patches, patch_dim), got {tuple(prediction.shape)}"
            )
        if target.shape != prediction.shape:
            raise ValueError(
                f"target must have the same shape as prediction {tuple(prediction.shape)}, got {tuple(target.shape)}"
            )
        if mask.shape != prediction.shape[:2]:
            raise ValueError(f"mask must have shape {tuple(prediction.shape[:2])}, got {tuple(mask.shape)}")
        if self.normalize_pixels:
            if target.shape[-1] < 2:
                raise ValueError("target must have patch_dim >= 2 to normalise pixels per patch")
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / torch.sqrt(var + _PIXEL_NORM_EPS)
        mask = mask.to(prediction.dtype)
        num_masked = mask.sum()
        if num_masked == 0:
            raise ValueError("mask must mark at least one patch as masked (1)")
        per_patch = (prediction - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / num_masked


class DistillationLoss(nn.Module):
    """Cross-entropy to a teacher's softened predictions, SimCLRv2's self-distillation.

    Chen et al., "Big Self-Supervised Models are Strong Semi-Supervised Learners", NeurIPS 2020 (eq. 2);
    Hinton et al., "Distilling the Knowledge in a Neural Network", 2015::

        loss = mean_b -sum_c softmax(teacher_logits / T)[b, c] * log_softmax(student_logits / T)[b, c]

    Plain cross-entropy, not scaled by ``T^2`` (SimCLRv2 uses ``T = 1``, where the two agree). The teacher
    logits are expected to carry no gradient.

    Shape: student_logits (batch, classes), teacher_logits (batch, classes) -> scalar.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        _check_positive("temperature", temperature)
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
        teacher_probs = F.softmax(teacher_logits / self.temperature, dim=-1)
        student_log_probs = F.log_softmax(student_logits / self.temperature, dim=-1)
        return -(teacher_probs * student_log_probs).sum(dim=-1).mean()
