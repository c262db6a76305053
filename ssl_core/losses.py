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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssl_core.distributed import gather_with_grad, is_distributed, rank

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

    ``negatives`` (optional, SimCLRv2's memory, Chen et al. 2020b Sec. 2): extra rows ``n_j`` (L2-normalised
    inside, no gradient expected) that join every anchor's denominator: ``+ sum_j exp(z_a . n_j / T)``.

    Shape: z1 (batch, dim), z2 (batch, dim), negatives (queue_size, dim) or None -> scalar.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False) -> None:
        super().__init__()
        _check_positive("temperature", temperature)
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
        _check_pair("z1", z1, "z2", z2)
        if negatives is not None and (negatives.ndim != 2 or negatives.shape[1] != z1.shape[1]):
            raise ValueError(f"negatives must have shape (queue_size, {z1.shape[1]}), got {tuple(negatives.shape)}")
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
        if negatives is not None:
            queue = F.normalize(negatives.to(z1.dtype), dim=1)
            logits = torch.cat([logits, torch.cat([z1, z2]) @ queue.T / self.temperature], dim=1)
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



def ema_center_update(center: torch.Tensor, total: torch.Tensor, count: torch.Tensor, momentum: float,
                      gather_distributed: bool) -> None:
    """``center <- momentum * center + (1 - momentum) * total / max(count, 1)``, in place; with
    ``gather_distributed`` and a process group, ``total`` and ``count`` are first summed over ranks (all-reduce), so
    every rank's center follows the global batch, as DINO's reference code does. Shape: center and total (1, dim),
    count (1,)."""
    if gather_distributed and is_distributed():
        dist.all_reduce(total)
        dist.all_reduce(count)
    batch_center = (total / count.clamp_min(1.0)).to(center.dtype)
    center.mul_(momentum).add_(batch_center, alpha=1 - momentum)


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
    ``centering="sinkhorn"`` (DINOv2, Oquab et al. 2023) replaces the centred softmax by ``sinkhorn_knopp`` of
    all teacher crops together, and the center is then left unchanged.

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
        centering: str = "center",
    ) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim!r}")
        _check_centering(centering)
        self.centering = centering
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

        if self.centering == "sinkhorn":
            batch = teacher_out[0].shape[0]
            teacher_probs = list(sinkhorn_knopp(torch.cat(list(teacher_out)), temperature,
                                                gather_distributed=self.gather_distributed).split(batch))
        else:
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
        if self.centering == "center":
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
        count = torch.full((1,), float(teacher.shape[0]), device=teacher.device)
        ema_center_update(self.center, teacher.sum(dim=0, keepdim=True), count, self.center_momentum,
                          self.gather_distributed)


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


# ------------------------------------------------------------------------- DINOv2 / iBOT / I-JEPA (ViT methods)

CENTERINGS = ("center", "sinkhorn")
_KOLEO_EPS = 1e-8  # DINOv2's KoLeoLoss


def _check_centering(centering: str) -> None:
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {list(CENTERINGS)}, got {centering!r}")


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    temperature: float,
    iterations: int = 3,
    weights: torch.Tensor | None = None,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """Sinkhorn-Knopp normalisation of teacher logits into soft assignments (SwAV; DINOv2's teacher centering).

    With ``Q = exp(logits / temperature)^T`` (K prototypes x B samples, columns of weight 0 dropped) scaled to sum
    1, ``iterations`` times: each row (prototype) is scaled to sum ``1 / K``, then each column (sample) to sum
    ``1 / B``; the result is ``B * Q^T``, each row a probability vector, every prototype used equally over the
    batch. ``weights`` (B,) of 0/1 marks the samples that count (iBOT's masked patches); B is their number, over
    all ranks when ``gather_distributed`` and a process group is initialised. Rows of weight 0 come back as 0.
    Computed in float32 without gradient. Shape: (batch, K) -> (batch, K).
    """
    _check_positive("temperature", temperature)
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must have shape (batch, K), got {tuple(teacher_logits.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations!r}")
    distributed = gather_distributed and is_distributed()
    logits = teacher_logits.float() / temperature
    peak = logits.max().reshape(1)
    if distributed:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    q = torch.exp(logits - peak).T  # (K, B); the common shift cancels in the normalisation
    column_weights = torch.ones(q.shape[1], device=q.device) if weights is None else weights.float().reshape(-1)
    if column_weights.shape != (q.shape[1],):
        raise ValueError(f"weights must have shape ({q.shape[1]},), got {tuple(weights.shape)}")
    q = q * column_weights
    num_prototypes = q.shape[0]
    num_samples = column_weights.sum().reshape(1)
    total = q.sum().reshape(1)
    if distributed:
        dist.all_reduce(num_samples)
        dist.all_reduce(total)
    q = q / total
    for _ in range(iterations):
        row_sums = q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(row_sums)
        q = q / row_sums.clamp_min(torch.finfo(q.dtype).tiny) / num_prototypes
        q = q / q.sum(dim=0, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny) / num_samples
    return (q * num_samples).T


class KoLeoLoss(nn.Module):
    """The Kozachenko-Leonenko differential-entropy regulariser of DINOv2 (Sablayrolles et al. 2019; Oquab et al.
    2023): it pushes each feature away from its nearest neighbour in the batch, spreading features uniformly::

        x_i = z_i / ||z_i||,   d_i = min_{j != i} ||x_i - x_j||,   loss = -mean_i log(d_i + 1e-8)

    Computed over the local batch (as DINOv2 does). Shape: (batch >= 2, dim) -> scalar.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"features must have shape (batch >= 2, dim), got {tuple(features.shape)}")
        x = F.normalize(features.float(), dim=-1, eps=_KOLEO_EPS)
        with torch.no_grad():
            similarity = x @ x.T
            similarity.fill_diagonal_(-2.0)  # below any cosine: never one's own neighbour
            nearest = similarity.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=_KOLEO_EPS)
        return -torch.log(distances + _KOLEO_EPS).mean()


class IBOTPatchLoss(nn.Module):
    """iBOT's masked-token self-distillation (Zhou et al. 2022), as DINOv2 uses it: for every masked patch the
    student's patch-head output matches the teacher's (which saw the unmasked image)::

        P_t[b, n] = softmax((t[b, n] - center) / teacher_temperature)   (or sinkhorn_knopp over masked patches)
        loss      = mean_b [ sum_{n masked in b} -sum_k P_t[b, n, k] log softmax(s[b, n] / student_temperature)_k
                             / (number of masked patches of b) ]

    Every image must have at least one masked patch. With ``centering="center"`` the center (buffer, (1, out_dim))
    then follows the mean of the teacher's masked patch outputs (over ranks when ``gather_distributed``)::

        center = center_momentum * center + (1 - center_momentum) * mean_{masked (b, n)} t[b, n]

    Shape: student (batch, patches, out_dim), teacher same, mask (batch, patches) bool (True = masked) -> scalar.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        center_momentum: float = 0.9,
        centering: str = "center",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim!r}")
        _check_positive("student_temperature", student_temperature)
        _check_positive("teacher_temperature", teacher_temperature)
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum!r}")
        _check_centering(centering)
        self.out_dim, self.centering, self.gather_distributed = out_dim, centering, gather_distributed
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student_patches: torch.Tensor,
        teacher_patches: torch.Tensor,
        mask: torch.Tensor,
        teacher_temperature: float | None = None,
    ) -> torch.Tensor:
        temperature = self.teacher_temperature if teacher_temperature is None else teacher_temperature
        _check_positive("teacher_temperature", temperature)
        if student_patches.ndim != 3 or student_patches.shape[-1] != self.out_dim:
            raise ValueError(
                f"student_patches must have shape (batch, patches, {self.out_dim}), got {tuple(student_patches.shape)}"
            )
        if teacher_patches.shape != student_patches.shape:
            raise ValueError(f"teacher_patches must have shape {tuple(student_patches.shape)}, "
                             f"got {tuple(teacher_patches.shape)}")
        if mask.shape != student_patches.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(student_patches.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        weights = mask.to(student_patches.dtype)
        if self.centering == "sinkhorn":
            flat = teacher_patches.reshape(-1, self.out_dim)
            teacher_probs = sinkhorn_knopp(flat, temperature, weights=weights.reshape(-1),
                                           gather_distributed=self.gather_distributed).view_as(teacher_patches)
        else:
            teacher_probs = F.softmax((teacher_patches - self.center) / temperature, dim=-1)
        student_log_probs = F.log_softmax(student_patches / self.student_temperature, dim=-1)
        per_patch = -(teacher_probs * student_log_probs).sum(dim=-1)  # (batch, patches)
        per_image = (per_patch * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        loss = per_image.mean()
        if self.centering == "center":
            self.update_center(teacher_patches, weights)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_patches: torch.Tensor, weights: torch.Tensor) -> None:
        """EMA of the mean teacher output over the masked patches (and ranks, if gathering)."""
        masked_sum = (teacher_patches.float() * weights.unsqueeze(-1)).sum(dim=(0, 1)).unsqueeze(0)
        ema_center_update(self.center, masked_sum, weights.sum().reshape(1).float(), self.center_momentum,
                          self.gather_distributed)


class FeaturePredictionLoss(nn.Module):
    """I-JEPA's loss (Assran et al. 2023): predicted features against the target encoder's, in feature space::

        t'   = layer_norm(t) over the feature dim (no affine, eps 1e-5)    if normalize_target
        loss = mean_{b, n, d} (prediction[b, n, d] - t'[b, n, d])^2

    The paper's code uses a smooth-L1 distance; this is the L2 of the paper's text. The target is expected to
    carry no gradient (EMA encoder under ``no_grad``).

    Shape: prediction (batch, tokens, dim), target same -> scalar.
    """

    def __init__(self, normalize_target: bool = True) -> None:
        super().__init__()
        self.normalize_target = normalize_target

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if prediction.ndim != 3:
            raise ValueError(f"prediction must have shape (batch, tokens, dim), got {tuple(prediction.shape)}")
        if target.shape != prediction.shape:
            raise ValueError(
                f"target must have the same shape as prediction {tuple(prediction.shape)}, got {tuple(target.shape)}"
            )
        if self.normalize_target:
            target = F.layer_norm(target, (target.shape[-1],))
        return (prediction - target).pow(2).mean()


class NCELoss(nn.Module):
    """Noise-contrastive estimation of the non-parametric instance softmax (NPID; PIRL reuses it).

    Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018, Sec. 3.2;
    Misra & van der Maaten, "Self-Supervised Learning of Pretext-Invariant Representations" (PIRL), CVPR 2020.

    With ``s+`` the similarity of a feature to its own memory row, ``s-_k`` its similarities to ``K`` rows drawn
    uniformly from an ``N``-row memory bank (noise ``P_n = 1/N``) and ``Z`` the normaliser::

        P(s) = exp(s / T) / Z,     h(s) = P(s) / (P(s) + K / N)
        loss = mean_b [ -log h(s+_b) - sum_k log(1 - h(s-_bk)) ]

    ``Z`` is a constant estimated once by Monte Carlo (``estimate_normalizer``), as in the paper. Computed in log
    space (``log(P + K/N)`` by ``logaddexp``). Default temperature 0.07 is the paper's.

    Shape: positive (batch,), negatives (batch, K), normalizer scalar -> scalar.
    """

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        _check_positive("temperature", temperature)
        self.temperature = temperature

    def forward(self, positive: torch.Tensor, negatives: torch.Tensor, normalizer: torch.Tensor,
                num_instances: int) -> torch.Tensor:
        if positive.ndim != 1:
            raise ValueError(f"positive must have shape (batch,), got {tuple(positive.shape)}")
        if negatives.ndim != 2 or negatives.shape[0] != positive.shape[0]:
            raise ValueError(f"negatives must have shape ({positive.shape[0]}, K), got {tuple(negatives.shape)}")
        if num_instances <= 0:
            raise ValueError(f"num_instances must be > 0, got {num_instances}")
        log_noise = torch.log(torch.tensor(negatives.shape[1] / num_instances, dtype=torch.float32,
                                           device=positive.device))
        log_z = torch.log(normalizer.float())
        log_p_positive = positive.float() / self.temperature - log_z
        log_p_negatives = negatives.float() / self.temperature - log_z
        log_h_positive = log_p_positive - torch.logaddexp(log_p_positive, log_noise)
        log_one_minus_h = log_noise - torch.logaddexp(log_p_negatives, log_noise)
        return -(log_h_positive + log_one_minus_h.sum(dim=1)).mean()

    def estimate_normalizer(self, positive: torch.Tensor, negatives: torch.Tensor, num_instances: int) -> torch.Tensor:
        """``Z = N * mean(exp(s / T))`` over every similarity of the batch (positives and negatives), detached."""
        scores = torch.cat([positive.detach().float().reshape(-1), negatives.detach().float().reshape(-1)])
        return num_instances * torch.exp(scores / self.temperature).mean()


class ProtoNCELoss(nn.Module):
    """The prototype term of PCL's ProtoNCE, averaged over ``M`` clusterings of different granularity.

    Li et al., "Prototypical Contrastive Learning of Unsupervised Representations", ICLR 2021, eq. 11. With ``v``
    the L2-normalised feature, ``c_{m,j}`` the L2-normalised prototypes of clustering ``m``, ``phi_{m,j}`` their
    concentrations and ``s_m`` the prototype the image was assigned to::

        loss = 1/M sum_m mean_b -log( exp(v_b . c_{m,s_m(b)} / phi_{m,s_m(b)}) / sum_j exp(v_b . c_{m,j} / phi_{m,j}) )

    Every prototype of a clustering is a negative (the paper samples ``r`` of them when there are many).
    MoCo's InfoNCE term is added by the method.

    Shape: features (batch, dim), per clustering: prototypes (K_m, dim), concentrations (K_m,), assignments
    (batch,) long -> scalar.
    """

    def forward(self, features: torch.Tensor, prototypes: Sequence[torch.Tensor],
                concentrations: Sequence[torch.Tensor], assignments: Sequence[torch.Tensor]) -> torch.Tensor:
        if not len(prototypes) == len(concentrations) == len(assignments) > 0:
            raise ValueError("prototypes, concentrations and assignments must be non-empty lists of equal length, "
                             f"got {len(prototypes)}, {len(concentrations)}, {len(assignments)}")
        features = F.normalize(features.float(), dim=1)
        losses = []
        for centroids, concentration, assigned in zip(prototypes, concentrations, assignments, strict=True):
            if centroids.ndim != 2 or centroids.shape[1] != features.shape[1]:
                raise ValueError(f"prototypes must have shape (K, {features.shape[1]}), got {tuple(centroids.shape)}")
            if concentration.shape != (centroids.shape[0],) or assigned.shape != (features.shape[0],):
                raise ValueError(f"concentrations must be ({centroids.shape[0]},) and assignments "
                                 f"({features.shape[0]},), got {tuple(concentration.shape)}, {tuple(assigned.shape)}")
            logits = features @ F.normalize(centroids.float(), dim=1).T / concentration.float()
            losses.append(F.cross_entropy(logits, assigned))
        return torch.stack(losses).mean()


class CountingLoss(nn.Module):
    """Counting visual primitives (Noroozi, Pirsiavash & Favaro, ICCV 2017, eq. 5): the counts of the whole
    (downsampled) image equal the sum of the counts of its tiles, contrasted with another image so that the
    all-zero counting vector is not a solution::

        loss = mean_b ||whole_b - tile_sum_b||^2 + max(0, margin - ||other_whole_b - tile_sum_b||^2)

    with ``tile_sum_b = sum_j phi(T_j x_b)``, ``whole_b = phi(D x_b)`` and ``other_whole_b = phi(D y_b)`` for another
    image ``y_b``. Shape: three (batch, dim) -> scalar.
    """

    def __init__(self, margin: float = 10.0) -> None:
        super().__init__()
        _check_positive("margin", margin)
        self.margin = margin

    def forward(self, whole: torch.Tensor, tile_sum: torch.Tensor, other_whole: torch.Tensor) -> torch.Tensor:
        _check_pair("whole", whole, "tile_sum", tile_sum)
        _check_pair("whole", whole, "other_whole", other_whole)
        whole, tile_sum, other_whole = whole.float(), tile_sum.float(), other_whole.float()
        positive = (whole - tile_sum).pow(2).sum(1)
        negative = (other_whole - tile_sum).pow(2).sum(1)
        return (positive + (self.margin - negative).clamp(min=0.0)).mean()


def _check_images(first_name: str, first: torch.Tensor, second_name: str, second: torch.Tensor) -> None:
    """Both tensors must be (B, C, H, W) with equal shapes."""
    if first.ndim != 4 or second.shape != first.shape:
        raise ValueError(f"{first_name} and {second_name} must be (B, C, H, W) of one shape, "
                         f"got {tuple(first.shape)} and {tuple(second.shape)}")


class RegionReconstructionLoss(nn.Module):
    """Mean squared error over the pixels of a region (context encoder: the masked centre; denoising autoencoder:
    the whole image)::

        loss = sum_{b,c,h,w} mask_{b,h,w} (prediction - target)^2 / (C * sum_{b,h,w} mask_{b,h,w})

    Shape: prediction, target (B, C, H, W); mask (B, 1, H, W) or (1, 1, H, W), 1 = counted -> scalar.
    """

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _check_images("prediction", prediction, "target", target)
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != prediction.shape[-2:]:
            raise ValueError(f"mask must have shape (B or 1, 1, {prediction.shape[-2]}, {prediction.shape[-1]}), "
                             f"got {tuple(mask.shape)}")
        mask = mask.float().expand(prediction.shape[0], 1, *prediction.shape[-2:])
        squared = (prediction.float() - target.float()).pow(2) * mask
        return squared.sum() / (mask.sum().clamp(min=1.0) * prediction.shape[1])


class WeightedSoftCrossEntropy(nn.Module):
    """Cross-entropy against soft targets with a weight per position (colorization, Zhang, Isola & Efros 2016,
    eq. 2: soft-encoded ab bins, class rebalancing weights ``v``)::

        loss = sum_{b,h,w} weight_{b,h,w} * (-sum_q target_{b,q,h,w} log softmax(logits)_{b,q,h,w}) / (B H W)

    Shape: logits, target (B, Q, H, W); weight (B, H, W) -> scalar.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        _check_images("logits", logits, "target", target)
        if weight.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"weight must have shape {(logits.shape[0], *logits.shape[2:])}, got {tuple(weight.shape)}")
        per_position = -(target.float() * F.log_softmax(logits.float(), dim=1)).sum(1)
        return (weight.float() * per_position).mean()
