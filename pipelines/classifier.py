"""The image classifier of the SimCLRv2 downstream stages: encoder -> (first layers of the projection head) -> linear.

``Classifier`` is what ``finetune`` trains (the teacher) and what ``distill`` trains from scratch (the student);
both are logged as MLflow PyTorch models whose ``forward`` maps normalised float images to logits. The
normalisation an instance expects is carried in its ``mean`` / ``std`` attributes (its training views used them).

SimCLRv2 (Chen et al., 2020b, Sec. 2): fine-tune "from the middle layer of the projection head", i.e. keep the
encoder and the first ``head_layers`` blocks (``Linear -> BN -> ReLU``) of the 3-layer head and put a linear
classifier on top; ``head_layers=0`` is classic fine-tuning of the encoder alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ssl_core import augment
from ssl_core.backbones import build_backbone
from ssl_core.evaluate import extract_features
from ssl_core.methods import build_method

Normalizer = Callable[[Tensor], Tensor]


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
        mean: Sequence[float] = augment.IMAGENET_MEAN,
        std: Sequence[float] = augment.IMAGENET_STD,
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

    def normalizer(self) -> Normalizer:
        """Mean/std normalisation this classifier expects, for images already in [0, 1]."""
        return lambda images: augment.normalize(images, self.mean, self.std)


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


def classifier_from_pretrain_checkpoint(
    method_name: str,
    method_config: Mapping[str, Any],
    checkpoint_state: Mapping[str, Any],
    head_layers: int,
    num_classes: int,
) -> Classifier:
    """The pretrained ``method``'s encoder and first ``head_layers`` projection-head blocks under a new linear layer.

    ``checkpoint_state`` is a pretrain checkpoint (``{"model": method.state_dict(), ...}``). The classifier's
    ``mean`` / ``std`` are those of the method's augmentation preset, the normalisation the encoder was trained on.
    """
    method = build_method(method_name, dict(method_config))
    method.load_state_dict(checkpoint_state["model"])
    head = nn.Sequential()
    if head_layers > 0:
        projection_head = getattr(method, "projection_head", None)
        if projection_head is None:
            raise ValueError(
                f"finetune.head_layers={head_layers} needs a projection head, but method {method_name!r} has none; "
                "set finetune.head_layers to 0"
            )
        available = len(projection_head.layers)
        if head_layers > available:
            raise ValueError(
                f"finetune.head_layers={head_layers} exceeds the {available} layers of method {method_name!r}'s "
                "projection head"
            )
        head = projection_head.layers[:head_layers]
    view_config = next(iter(method.view_generator().view_configs.values()))
    return Classifier(method.encoder, head, num_classes, mean=view_config.mean, std=view_config.std)


def student_classifier(
    backbone_name: str,
    image_size: int,
    num_classes: int,
    *,
    mean: Sequence[float] = augment.IMAGENET_MEAN,
    std: Sequence[float] = augment.IMAGENET_STD,
) -> Classifier:
    """A randomly initialised ``backbone_name`` (small-image stem) with a linear layer: the distillation student."""
    encoder = build_backbone(backbone_name, small_images=True, image_size=image_size)
    return Classifier(encoder, nn.Sequential(), num_classes, mean=mean, std=std)


def light_augmentation(image_size: int, mean: Sequence[float], std: Sequence[float]) -> augment.ViewConfig:
    """The fine-tuning / distillation view: random resized crop with scale (0.5, 1) and a horizontal flip, no colour
    changes, normalised with ``mean`` / ``std``."""
    return augment.ViewConfig(
        image_size, crop_scale=(0.5, 1.0), jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0,
        mean=tuple(mean), std=tuple(std),
    )


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
                              normalize=classifier.normalizer())
    return (logits.argmax(dim=1) == labels).float().mean().item()
