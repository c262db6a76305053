"""ReMixMatch's self-supervised rotation loss (Berthelot et al., 2020, Sec. 3.3): one strong view of each unlabeled
image is rotated by ``r`` quarter turns, ``r`` uniform in {0, 1, 2, 3}, and a linear rotation head on the
classifier's penultimate features predicts ``r``:

    L_rot = mean_b CE(rotation_head(features(rotate(u_hat_b, r_b))), r_b)

The head is trained with the classifier, so it lives in the module the optimizer and DDP see: ``RotationHeaded``
(its forward returns the class logits and the rotation logits side by side, one forward for both). The fine-tune
stage trains ``training_model(classifier, cfg)`` and keeps ``trained_classifier(model)``: the head is dropped after
training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_core.classifier import Classifier
from ssl_core.methods.rotation import rotate_batch
from ssl_core.semi.config import SemiConfig

ROTATIONS = 4
"""Quarter turns 0, 90, 180, 270 degrees."""


class RotationHeaded(nn.Module):
    """``classifier`` plus a linear rotation head on its penultimate features (``head(encoder(x))``).

    Shape: (batch, 3, H, W) -> (batch, num_classes + 4): class logits, then rotation logits.
    """

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.rotation = nn.Linear(classifier.head_out_dim, ROTATIONS)

    def forward(self, images: Tensor) -> Tensor:
        features = self.classifier.head(self.classifier.encoder(images))
        return torch.cat([self.classifier.linear(features), self.rotation(features)], dim=1)


def needs_rotation_head(cfg: SemiConfig) -> bool:
    return cfg.algorithm == "remixmatch" and cfg.rotation_weight > 0


def training_model(classifier: Classifier, cfg: SemiConfig) -> nn.Module:
    """The module fine-tuning trains: ``RotationHeaded(classifier)`` for remixmatch with ``rotation_weight > 0``,
    else ``classifier`` itself."""
    return RotationHeaded(classifier) if needs_rotation_head(cfg) else classifier


def trained_classifier(model: nn.Module) -> Classifier:
    """The classifier inside ``training_model``'s result (the rotation head dropped)."""
    return model.classifier if isinstance(model, RotationHeaded) else model


def random_rotations(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(images rotated by r_b quarter turns counter-clockwise, r_b)``, ``r_b`` uniform in {0..3} from
    ``generator``. Shape: (B, C, H, H) -> same, (B,) int64."""
    quarter_turns = torch.randint(ROTATIONS, (len(images),), generator=generator, device=generator.device)
    quarter_turns = quarter_turns.to(images.device)
    return rotate_batch(images, quarter_turns), quarter_turns


def rotation_loss(rotation_logits: Tensor, quarter_turns: Tensor) -> Tensor:
    """``mean_b CE(rotation_logits_b, r_b)``. Shape: (batch, 4), (batch,) -> scalar."""
    if rotation_logits.shape[1] != ROTATIONS:
        raise ValueError(f"rotation logits need {ROTATIONS} columns, got shape {tuple(rotation_logits.shape)}")
    return F.cross_entropy(rotation_logits.float(), quarter_turns)
