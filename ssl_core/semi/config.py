"""The hyperparameters of semi-supervised fine-tuning (``finetune.semi``): one bounded, validated dataclass.

Every algorithm reads the fields it needs (listed per field); each default is the paper's value for the algorithm
named in brackets. ``unlabeled_ratio`` (FixMatch's mu) sets the unlabeled batch: ``mu x`` the labeled one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ssl_core.hparams import FieldValueError, Validated, bounded

ALGORITHMS: tuple[str, ...] = (
    "none", "pseudo_label", "entropy_minimization", "pi_model", "temporal_ensembling", "mean_teacher", "vat", "uda",
    "mixmatch", "remixmatch", "fixmatch", "label_propagation",
)


@dataclass(frozen=True)
class SemiConfig(Validated):
    algorithm: str = bounded("none", choices=ALGORITHMS)
    unlabeled_ratio: int = bounded(7, 1, 64)
    """Unlabeled rows per labeled row in a step (every algorithm but none) [FixMatch: 7]."""
    unlabeled_rows: int = bounded(50_000, 2, 100_000_000)
    """At most this many train rows form the unlabeled pool each worker holds in memory (every labeled row of the
    fraction is kept, the rest is a seeded random subset)."""
    weight: float = bounded(1.0, 0.0, 1000.0)
    """lambda_u: weight of the unlabeled loss [FixMatch 1, MixMatch 75 (CIFAR-10 uses 75), mean teacher ~1-100]."""
    rampup_fraction: float = bounded(0.0, 0.0, 1.0)
    """The weight rises as exp(-5 (1 - t)^2) over this fraction of the steps (Laine & Aila); 0 = constant."""
    threshold: float = bounded(0.95, 0.0, 1.0)
    """Confidence threshold of the pseudo-label (pseudo_label, fixmatch, uda) [FixMatch 0.95; UDA 0.8]."""
    temperature: float = bounded(0.5, 0.01, 1.0)
    """Sharpening temperature (mixmatch, remixmatch, uda) [MixMatch 0.5; UDA 0.4]."""
    mixup_alpha: float = bounded(0.75, 0.01, 10.0)
    """Beta(alpha, alpha) of MixUp (mixmatch, remixmatch) [MixMatch 0.75]."""
    augmentations: int = bounded(2, 1, 16)
    """K: augmentations per unlabeled image (mixmatch: weak; remixmatch: strong) [MixMatch 2; ReMixMatch 8]."""
    ema_momentum: float = bounded(0.99, 0.0, 1.0)
    """EMA of the teacher (mean_teacher) [Tarvainen & Valpola: 0.99 ramp-up, 0.999 after]."""
    ensemble_momentum: float = bounded(0.6, 0.0, 0.999)
    """alpha of the ensemble of past predictions (temporal_ensembling) [Laine & Aila 0.6]."""
    vat_epsilon: float = bounded(6.0, 0.0, 100.0)
    """Norm of the adversarial perturbation in normalised-pixel units (vat) [Miyato et al. CIFAR-10: 6]."""
    vat_xi: float = bounded(1e-6, 1e-9, 10.0)
    """Finite-difference step of the power iteration (vat) [1e-6]."""
    vat_power_iterations: int = bounded(1, 1, 20)
    """Power iterations for the perturbation direction (vat) [1]."""
    tsa: str = bounded("none", choices=("none", "linear", "log", "exp"))
    """Training-signal annealing of the labeled loss (uda) [UDA: exp for few labels]."""
    strong_ops: int = bounded(2, 0, 8)
    """RandAugment ops per strong view (uda, fixmatch, remixmatch) [FixMatch 2]."""
    strong_magnitude: float = bounded(1.0, 0.0, 1.0)
    """Highest op strength of the strong view; each op draws uniformly below it [FixMatch: random magnitude]."""
    cutout: float = bounded(0.5, 0.0, 1.0)
    """Side of the cutout square closing the strong view, as a fraction of the image side [FixMatch 0.5]."""
    alignment_momentum: float = bounded(0.999, 0.0, 1.0)
    """EMA of the model's mean prediction on unlabeled rows for distribution alignment (remixmatch)."""
    rotation_weight: float = bounded(0.5, 0.0, 100.0)
    """lambda_r of the self-supervised rotation loss on a rotated strong view (remixmatch; 0 = no rotation head)
    [ReMixMatch 0.5]."""
    propagation_k: int = bounded(20, 1, 1000)
    """Neighbours per row of the kNN graph (label_propagation) [Iscen et al. 50]."""
    propagation_alpha: float = bounded(0.99, 0.0, 0.9999)
    """alpha of Z = (I - alpha S)^-1 Y (label_propagation) [0.99]."""
    propagation_gamma: float = bounded(3.0, 1.0, 10.0)
    """Affinity power: w_ij = max(0, cos(f_i, f_j))^gamma (label_propagation) [3]."""
    propagation_iterations: int = bounded(20, 1, 1000)
    """Conjugate-gradient iterations of the propagation (label_propagation) [20]."""

    def check(self) -> None:
        if self.algorithm == "remixmatch" and self.strong_ops == 0 and self.cutout == 0.0:
            raise FieldValueError("strong_ops", self.strong_ops, "must be > 0 (or cutout > 0) for remixmatch's "
                                  "augmentation anchoring")
