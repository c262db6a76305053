"""The training objective of semi-supervised fine-tuning: one labeled batch (the loop's) plus ``unlabeled_ratio``
times as many rows drawn from an in-memory unlabeled pool, combined as

    loss = supervised(labeled) + w(step) * unsupervised(unlabeled),   w = rampup_weight(step, weight, rampup_fraction)

per ``SemiConfig.algorithm`` (the unlabeled terms are in ``ssl_core.semi.losses``; views in ``semi_views``):

- ``pseudo_label`` / ``entropy_minimization``: one weak view; confident argmax as hard target / prediction entropy.
- ``pi_model``: two weak views; squared distance of the first's softmax to the second's (detached).
- ``temporal_ensembling``: one weak view against ``TemporalEnsemble``'s bias-corrected EMA of the row's past
  predictions (updated each time the row is drawn; rows never seen before are left out).
- ``mean_teacher``: a weak view through the model against another weak view through an EMA copy
  (``ssl_core.ema``, updated after each optimizer step, momentum ``ema_momentum``).
- ``vat``: ``KL(p(x) || p(x + eps d))`` with ``d`` from ``adversarial_direction`` on the weak view.
- ``uda``: labeled CE under training-signal annealing; sharpened weak-view target for the strong view, masked.
- ``fixmatch``: confident weak-view argmax as the hard target of the strong view.
- ``mixmatch``: K weak views -> guessed, sharpened label; MixUp (lam' = max(lam, 1 - lam)) of labeled and
  unlabeled rows with a shuffled copy of both; soft CE on labeled, squared L2 / classes on unlabeled.
- ``remixmatch``: the weak view's prediction, distribution-aligned (running mean of predictions vs the labeled
  class marginal) and sharpened, anchors K strong views; MixUp as MixMatch with soft CE on both, plus
  ``0.5 x`` the soft CE of the first strong view un-mixed, plus ``rotation_weight x`` the rotation loss of that
  view rotated by random quarter turns (``ssl_core.semi.rotation``: the model must be ``training_model(...)``,
  whose extra 4 output columns are the rotation head). Both extra terms sit inside the unlabeled term, so
  ``weight`` and its ramp-up scale them too (the paper's lambda_u1 = lambda_r = 0.5 are absolute).
- ``label_propagation``: the pool's labels propagated once over a kNN graph of the initial encoder's features
  (``propagation.propagated_labels``), then certainty-weighted CE on the weak view.

Auxiliary forwards that need no parameter gradient (label guesses, VAT's power iteration, the EMA teacher) run on
the unwrapped module, so a DDP-wrapped model sees exactly one forward and one backward per step. The state of
``temporal_ensembling`` (the ensemble), ``mean_teacher`` (the EMA teacher) and ``remixmatch`` (the running
marginal) lives in this object, per worker (each worker holds its own part of the pool): ``state_dict()`` /
``load_state_dict()`` carry it with the step count, and restoring it continues exactly as the uninterrupted run.
The pipeline's training loop checkpoints every rank's state with the model (``pipelines.train_loop``'s
``stateful``) and a resumed fine-tune gives each rank its own back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_core.augment import Normalization, augment_float, host_to_device, strong_augment, to_float_image
from ssl_core.device import images_to_memory_format
from ssl_core.ema import ema_update, frozen_copy
from ssl_core.methods import StepOutput
from ssl_core.semi import losses
from ssl_core.semi.config import SemiConfig
from ssl_core.semi.rotation import ROTATIONS, needs_rotation_head, random_rotations, rotation_loss
from ssl_core.semi.targets import distribution_alignment, mixup, rampup_weight, sharpen, tsa_threshold
from ssl_core.semi.vat import adversarial_direction, kl_from_logits
from ssl_core.views import crop_flip_view

View = Callable[[Tensor, torch.Generator], Tensor]
REMIXMATCH_UNMIXED_WEIGHT = 0.5
"""ReMixMatch's lambda_u1 (0.5) relative to the mixed unlabeled term."""
FINETUNE_CROP_SCALE = (0.5, 1.0)


def semi_views(image_size: int, normalization: Normalization, cfg: SemiConfig,
               device: torch.device) -> tuple[View, View]:
    """``(weak, strong)`` views of uint8 batches: weak = random resized crop (scale 0.5-1) and flip (the
    fine-tuning view); strong = the same crop and flip, then ``strong_augment`` (RandAugment + cutout); both
    normalised and in the device's memory layout."""
    plain = crop_flip_view(image_size, FINETUNE_CROP_SCALE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def weak(images: Tensor, generator: torch.Generator) -> Tensor:
        return images_to_memory_format(normalization(augment_float(to_float_image(images), plain, generator)), device)

    def strong(images: Tensor, generator: torch.Generator) -> Tensor:
        cropped = augment_float(to_float_image(images), plain, generator)
        augmented = strong_augment(cropped, cfg.strong_ops, cfg.strong_magnitude, cfg.cutout, generator)
        return images_to_memory_format(normalization(augmented), device)

    return weak, strong


@dataclass
class UnlabeledPool:
    """The rows unlabeled batches are drawn from: uint8 images (N, 3, S, S) on the host and their labels (N,),
    -1 for rows outside the labeled fraction (only label_propagation and remixmatch's marginal read them)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels) or len(self.images) < 2:
            raise ValueError(f"an unlabeled pool needs >= 2 rows and one label per image, got {len(self.images)} "
                             f"images and {len(self.labels)} labels")


def pool_subset(labels: Tensor, max_rows: int, seed: int) -> Tensor:
    """Row indices of a pool of at most ``max_rows``: every labeled row (label >= 0), then a seeded random choice of
    the others (sorted). Shape: (N,) -> (M,) int64."""
    labeled = torch.nonzero(labels >= 0).flatten()
    others = torch.nonzero(labels < 0).flatten()
    room = max(0, max_rows - len(labeled))
    if len(others) > room:
        others = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:room]]
    return torch.cat([labeled, others]).sort().values


class TemporalEnsemble:
    """Laine & Aila's ensemble prediction per pool row: ``Z <- alpha Z + (1 - alpha) p`` each time the row is seen,
    target ``Z / (1 - alpha^t)`` after ``t`` updates (startup bias correction)."""

    def __init__(self, rows: int, num_classes: int, momentum: float, device: torch.device) -> None:
        self.momentum = momentum
        self.sums = torch.zeros(rows, num_classes, device=device)
        self.updates = torch.zeros(rows, device=device)

    def targets(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(targets (batch, classes), seen mask (batch,))``; unseen rows get zeros and mask 0."""
        updates = self.updates[rows]
        seen = (updates > 0).float()
        correction = (1.0 - self.momentum ** updates).clamp(min=1e-12).view(-1, 1)
        return self.sums[rows] / correction * seen.view(-1, 1), seen

    def update(self, rows: Tensor, probabilities: Tensor) -> None:
        self.sums[rows] = self.momentum * self.sums[rows] + (1.0 - self.momentum) * probabilities.detach().float()
        self.updates[rows] += 1


def _one_hot(labels: Tensor, num_classes: int) -> Tensor:
    return F.one_hot(labels, num_classes).float()


class SemiObjective:
    """``objective(model, batch, generator) -> StepOutput`` of the module docstring, with ``before_epoch`` and
    ``after_step`` for the training loop (they keep the step count, which the ramp-up and TSA read, and the EMA
    teacher). ``propagated`` holds label_propagation's ``(pseudo labels, weights)`` per pool row."""

    def __init__(self, cfg: SemiConfig, pool: UnlabeledPool, num_classes: int, views: tuple[View, View], *,
                 device: torch.device, total_steps: int, steps_per_epoch: int,
                 propagated: tuple[Tensor, Tensor] | None = None) -> None:
        if cfg.algorithm == "none":
            raise ValueError("finetune.semi.algorithm=none has no unlabeled objective")
        if cfg.algorithm == "label_propagation" and propagated is None:
            raise ValueError("label_propagation needs the propagated labels of the pool")
        self.cfg, self.pool, self.num_classes, self.device = cfg, pool, num_classes, device
        self.weak, self.strong = views
        self.total_steps, self.steps_per_epoch, self.step = total_steps, steps_per_epoch, 0
        self.propagated = None if propagated is None else tuple(t.to(device) for t in propagated)
        self.ensemble = TemporalEnsemble(len(pool.labels), num_classes, cfg.ensemble_momentum, device) \
            if cfg.algorithm == "temporal_ensembling" else None
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self._restored_teacher: dict[str, Tensor] | None = None
        counts = torch.bincount(pool.labels[pool.labels >= 0], minlength=num_classes).float()
        self.labeled_marginal = (counts / counts.sum().clamp(min=1.0)).to(device) if counts.sum() > 0 \
            else torch.full((num_classes,), 1.0 / num_classes, device=device)
        self.model_marginal = torch.full((num_classes,), 1.0 / num_classes, device=device)

    # ---------------------------------------------------------------------------------------- loop hooks
    def before_epoch(self, epoch: int) -> None:
        self.step = epoch * self.steps_per_epoch

    def after_step(self, step: int, total_steps: int) -> None:
        self.step = step + 1
        if self.teacher is not None and self.student is not None:
            ema_update(self.student, self.teacher, self.cfg.ema_momentum)

    # ---------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, object]:
        """The state a resumed run needs: ``step``, ``model_marginal``, and where present ``ensemble_sums`` /
        ``ensemble_updates`` and ``teacher`` (the EMA teacher's state dict). Tensors are cloned to the CPU."""
        state: dict[str, object] = {"algorithm": self.cfg.algorithm, "step": self.step,
                                    "model_marginal": self.model_marginal.detach().cpu().clone()}
        if self.ensemble is not None:
            state["ensemble_sums"] = self.ensemble.sums.detach().cpu().clone()
            state["ensemble_updates"] = self.ensemble.updates.detach().cpu().clone()
        teacher_state = self._restored_teacher if self.teacher is None else self.teacher.state_dict()
        if teacher_state is not None:
            state["teacher"] = {name: value.detach().cpu().clone() for name, value in teacher_state.items()}
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore ``state_dict()``'s result. The teacher is built lazily on the first step (it copies the model the
        objective is called with), so a restored teacher state is applied then."""
        if state["algorithm"] != self.cfg.algorithm:
            raise ValueError(f"checkpointed semi state is of algorithm {state['algorithm']!r}, this run's is "
                             f"{self.cfg.algorithm!r}")
        self.step = int(state["step"])
        self.model_marginal = state["model_marginal"].to(self.device).clone()
        if self.ensemble is not None:
            sums, updates = state["ensemble_sums"], state["ensemble_updates"]
            if sums.shape != self.ensemble.sums.shape:
                raise ValueError(f"checkpointed temporal ensemble has shape {tuple(sums.shape)}, this worker's pool "
                                 f"needs {tuple(self.ensemble.sums.shape)}")
            self.ensemble.sums, self.ensemble.updates = sums.to(self.device).clone(), updates.to(self.device).clone()
        teacher = state.get("teacher")
        if teacher is not None:
            if self.teacher is None:
                self._restored_teacher = teacher
            else:
                self.teacher.load_state_dict(teacher)

    # ---------------------------------------------------------------------------------------- the objective
    def _unlabeled(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        rows = torch.randint(len(self.pool.labels), (count,), generator=generator, device=generator.device)
        rows = rows.to(self.pool.images.device)
        return host_to_device(self.pool.images[rows], self.device), rows.to(self.device)

    def _beta(self, count: int, generator: torch.Generator) -> Tensor:
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device))
        draws = np.random.default_rng(seed).beta(self.cfg.mixup_alpha, self.cfg.mixup_alpha, size=count)
        return torch.from_numpy(draws).float().to(self.device)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> StepOutput:
        cfg = self.cfg
        inner = getattr(model, "module", model)
        labeled_images, labels = batch["image"], batch["label"]
        unlabeled, rows = self._unlabeled(cfg.unlabeled_ratio * len(labels), generator)
        weight = rampup_weight(self.step, self.total_steps, cfg.weight, cfg.rampup_fraction)
        algorithm = getattr(self, f"_{cfg.algorithm}")
        supervised, unsupervised, logs = algorithm(model, inner, self.weak(labeled_images, generator), labels,
                                                   unlabeled, rows, generator)
        loss = supervised + weight * unsupervised
        return StepOutput(loss, {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
                                 "unsupervised_weight": torch.tensor(weight), **logs})

    @staticmethod
    def _split(logits: Tensor, *sizes: int) -> tuple[Tensor, ...]:
        return tuple(logits.float().split(list(sizes)))

    def _weak_forward(self, model: nn.Module, labeled: Tensor, unlabeled_views: list[Tensor]) -> tuple[Tensor, ...]:
        logits = model(torch.cat([labeled, *unlabeled_views]))
        return self._split(logits, len(labeled), *(len(v) for v in unlabeled_views))

    def _pseudo_label(self, model, inner, labeled, labels, unlabeled, rows, generator):
        l_logits, u_logits = self._weak_forward(model, labeled, [self.weak(unlabeled, generator)])
        unsup, mask = losses.pseudo_label_loss(u_logits, self.cfg.threshold)
        return F.cross_entropy(l_logits, labels), unsup, {"mask_rate": mask.mean()}

    def _entropy_minimization(self, model, inner, labeled, labels, unlabeled, rows, generator):
        l_logits, u_logits = self._weak_forward(model, labeled, [self.weak(unlabeled, generator)])
        return F.cross_entropy(l_logits, labels), losses.entropy_loss(u_logits), {}

    def _pi_model(self, model, inner, labeled, labels, unlabeled, rows, generator):
        l_logits, first, second = self._weak_forward(
            model, labeled, [self.weak(unlabeled, generator), self.weak(unlabeled, generator)])
        return F.cross_entropy(l_logits, labels), losses.consistency_mse(first, torch.softmax(second, 1)), {}

    def _temporal_ensembling(self, model, inner, labeled, labels, unlabeled, rows, generator):
        l_logits, u_logits = self._weak_forward(model, labeled, [self.weak(unlabeled, generator)])
        targets, seen = self.ensemble.targets(rows)
        per_row = ((torch.softmax(u_logits, 1) - targets) ** 2).sum(dim=1)
        self.ensemble.update(rows, torch.softmax(u_logits.detach(), 1))
        return F.cross_entropy(l_logits, labels), (per_row * seen).mean(), {"seen_rate": seen.mean()}

    def _mean_teacher(self, model, inner, labeled, labels, unlabeled, rows, generator):
        if self.teacher is None:
            self.student, self.teacher = inner, frozen_copy(inner)
            if self._restored_teacher is not None:
                self.teacher.load_state_dict(self._restored_teacher)
                self._restored_teacher = None
        student_view, teacher_view = self.weak(unlabeled, generator), self.weak(unlabeled, generator)
        with torch.no_grad():
            targets = torch.softmax(self.teacher(teacher_view).float(), 1)
        l_logits, u_logits = self._weak_forward(model, labeled, [student_view])
        return F.cross_entropy(l_logits, labels), losses.consistency_mse(u_logits, targets), {}

    def _vat(self, model, inner, labeled, labels, unlabeled, rows, generator):
        view = self.weak(unlabeled, generator)
        with torch.no_grad():
            clean = inner(view).float()
        direction = adversarial_direction(inner, view, clean, self.cfg.vat_xi, self.cfg.vat_power_iterations,
                                          generator)
        l_logits, adv_logits = self._weak_forward(model, labeled, [view + self.cfg.vat_epsilon * direction])
        return F.cross_entropy(l_logits, labels), kl_from_logits(clean, adv_logits), {}

    def _uda(self, model, inner, labeled, labels, unlabeled, rows, generator):
        l_logits, weak, strong = self._weak_forward(
            model, labeled, [self.weak(unlabeled, generator), self.strong(unlabeled, generator)])
        threshold = tsa_threshold(self.step, self.total_steps, self.num_classes, self.cfg.tsa)
        supervised, kept = losses.tsa_cross_entropy(l_logits, labels, threshold)
        unsup, mask = losses.uda_loss(weak, strong, self.cfg.temperature, self.cfg.threshold)
        return supervised, unsup, {"mask_rate": mask.mean(), "tsa_kept_rate": kept.mean()}

    def _fixmatch(self, model, inner, labeled, labels, unlabeled, rows, generator):
        l_logits, weak, strong = self._weak_forward(
            model, labeled, [self.weak(unlabeled, generator), self.strong(unlabeled, generator)])
        unsup, mask = losses.fixmatch_loss(weak, strong, self.cfg.threshold)
        return F.cross_entropy(l_logits, labels), unsup, {"mask_rate": mask.mean()}

    def _mixed(self, model, labeled, label_targets, unlabeled_views, unlabeled_targets, generator, extra=()):
        """MixUp of (labeled, unlabeled views) with a shuffled copy of them; one forward of the mixed rows and the
        ``extra`` inputs. Returns logits (labeled, unlabeled, *extra) and the mixed targets."""
        inputs = torch.cat([labeled, *unlabeled_views])
        targets = torch.cat([label_targets, unlabeled_targets.repeat(len(unlabeled_views), 1)])
        order = torch.randperm(len(inputs), generator=generator, device=generator.device).to(inputs.device)
        mixed_inputs, mixed_targets = mixup(inputs, targets, inputs[order], targets[order],
                                            self._beta(len(inputs), generator))
        logits = model(torch.cat([mixed_inputs, *extra]))
        split = self._split(logits, len(labeled), len(inputs) - len(labeled), *(len(e) for e in extra))
        return split, mixed_targets[:len(labeled)], mixed_targets[len(labeled):]

    def _mixmatch(self, model, inner, labeled, labels, unlabeled, rows, generator):
        views = [self.weak(unlabeled, generator) for _ in range(self.cfg.augmentations)]
        with torch.no_grad():
            probabilities = torch.stack([torch.softmax(inner(v).float(), 1) for v in views])
            guess = losses.guessed_labels(probabilities, self.cfg.temperature)
        (l_logits, u_logits), l_targets, u_targets = self._mixed(
            model, labeled, _one_hot(labels, self.num_classes), views, guess, generator)
        return (losses.soft_cross_entropy(l_logits, l_targets),
                losses.mixmatch_unlabeled_loss(u_logits, u_targets), {})

    def _remixmatch(self, model, inner, labeled, labels, unlabeled, rows, generator):
        classes, rotating = self.num_classes, needs_rotation_head(self.cfg)
        with torch.no_grad():
            outputs = inner(self.weak(unlabeled, generator)).float()
            if outputs.shape[1] != classes + ROTATIONS * rotating:
                raise ValueError(f"remixmatch with rotation_weight={self.cfg.rotation_weight} needs a model with "
                                 f"{classes + ROTATIONS * rotating} outputs (ssl_core.semi.rotation.training_model), "
                                 f"got {outputs.shape[1]}")
            probabilities = torch.softmax(outputs[:, :classes], 1)
            momentum = self.cfg.alignment_momentum
            self.model_marginal = momentum * self.model_marginal + (1 - momentum) * probabilities.mean(0)
            guess = sharpen(distribution_alignment(probabilities, self.labeled_marginal, self.model_marginal),
                            self.cfg.temperature)
        views = [self.strong(unlabeled, generator) for _ in range(self.cfg.augmentations)]
        rotated, quarter_turns = random_rotations(views[0], generator) if rotating else (None, None)
        extra = (views[0], rotated) if rotating else (views[0],)
        (l_logits, u_logits, unmixed, *rotated_logits), l_targets, u_targets = self._mixed(
            model, labeled, _one_hot(labels, classes), views, guess, generator, extra=extra)
        unsup = losses.soft_cross_entropy(u_logits[:, :classes], u_targets) \
            + REMIXMATCH_UNMIXED_WEIGHT * losses.soft_cross_entropy(unmixed[:, :classes], guess)
        logs = {}
        if rotating:
            rotation = rotation_loss(rotated_logits[0][:, classes:], quarter_turns)
            unsup = unsup + self.cfg.rotation_weight * rotation
            logs["rotation_loss"] = rotation.detach()
        return losses.soft_cross_entropy(l_logits[:, :classes], l_targets), unsup, logs

    def _label_propagation(self, model, inner, labeled, labels, unlabeled, rows, generator):
        pseudo, weights = self.propagated
        l_logits, u_logits = self._weak_forward(model, labeled, [self.weak(unlabeled, generator)])
        per_row = F.cross_entropy(u_logits, pseudo[rows], reduction="none")
        return F.cross_entropy(l_logits, labels), (per_row * weights[rows]).mean(), {"mean_certainty":
                                                                                       weights[rows].mean()}
