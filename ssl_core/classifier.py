"""The image classifier of SimCLRv2-style fine-tuning and distillation: encoder -> trunk -> linear.

``Classifier`` is what fine-tuning trains (the teacher, from a pretrained method) and what distillation trains
from scratch (the student). Registered models are instances of it, so loading one needs ``ssl_core`` only. Its
``forward`` maps normalised float images to logits; the normalisation it expects travels with it (``mean`` /
``std``, those of the views its encoder was trained on).

SimCLRv2 (Chen et al., 2020b, Sec. 2): fine-tune "from the middle layer of the projection head", i.e. keep the
encoder and the first ``head_layers`` blocks (``Linear -> BN -> ReLU``) of the 3-layer head and put a linear
classifier on top; ``head_layers=0`` is classic fine-tuning of the encoder alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssl_core.augment import IMAGENET_MEAN, IMAGENET_STD, Normalization
from ssl_core.backbones import build_backbone
from ssl_core.evaluate import extract_features
from ssl_core.methods import SSLMethod


class Classifier(nn.Module):
    """``linear(head(encoder(images)))``. The ``linear`` layer starts at zero (as the linear probe does).

    ``head`` may be an empty ``nn.Sequential``; its output width ``head_out_dim`` is found by a dry forward of a
    zero batch in eval mode. Shape: (batch, 3, H, W) normalised float -> (batch, num_classes) logits.
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Sequential,
        num_classes: int,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        self.encoder = encoder
        self.head = head
        self.feature_dim = int(encoder.feature_dim)
        self.head_out_dim = _output_dim(head, self.feature_dim)
        self.num_classes = num_classes
        self.linear = nn.Linear(self.head_out_dim, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def forward(self, images: Tensor) -> Tensor:
        return self.linear(self.head(self.encoder(images)))

    def normalization(self) -> Normalization:
        """The mean/std normalisation this classifier expects, for images already in [0, 1]."""
        return Normalization(self.mean, self.std)


@torch.no_grad()
def _output_dim(head: nn.Sequential, in_dim: int) -> int:
    if len(head) == 0:
        return in_dim
    was_training = head.training
    head.eval()
    try:
        return int(head(torch.zeros(2, in_dim)).shape[-1])
    finally:
        head.train(was_training)


def classifier_from_method(method: SSLMethod, head_layers: int, num_classes: int) -> Classifier:
    """``method``'s encoder and ``method.finetune_head(head_layers)`` (shared modules) under a new linear layer,
    expecting the method's normalisation."""
    normalization = method.normalization()
    return Classifier(method.encoder, method.finetune_head(head_layers), num_classes, mean=normalization.mean,
                      std=normalization.std)


def student_classifier(
    backbone_name: str,
    image_size: int,
    num_classes: int,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Classifier:
    """A randomly initialised ``backbone_name`` (small-image stem) with a linear layer: the distillation student."""
    encoder = build_backbone(backbone_name, small_images=True, image_size=image_size)
    return Classifier(encoder, nn.Sequential(), num_classes, mean=mean, std=std)


def top1_accuracy(
    classifier: Classifier,
    images: Tensor,
    labels: Tensor,
    device: torch.device,
    batch_size: int = 512,
) -> float:
    """Top-1 accuracy of ``classifier`` on uint8 ``images`` (N, 3, H, W) with ``labels`` (N,), in eval mode and
    batches of ``batch_size``; the classifier's train/eval mode is restored."""
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    logits = extract_features(classifier, images, batch_size=batch_size, device=device,
                              normalize=classifier.normalization())
    return (logits.argmax(dim=1) == labels).float().mean().item()
