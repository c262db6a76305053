"""Recipes that fit the data: per method, the values a run takes when its config does not set them, chosen by the
image size (``ssl_core.views.is_small_image``: under 64 px, CIFAR-like, as the views already decide; 64 px and up:
ImageNet-like).

``recipe(method, image_size) -> Recipe(backbone, objective, optimizer)``: mappings of field -> value, the first two
of the method's ``Config`` fields, the last of the pipeline's ``pretrain`` section. The pipeline config
(``pipelines.config``) fills the fields the user's YAML leaves out from them (see ``Recipe`` for the groups); a value
the YAML sets always wins.

Every recipe sets the backbone stem: the small-image stem (3x3 stride-1 convolution, no max-pool) under 64 px, the
ImageNet stem (7x7 stride 2 + max-pool) from 64 px, where the CIFAR stem would cost 16x the activations.

Sources (in each comment): the papers' CIFAR settings and solo-learn's ``scripts/pretrain/cifar/*.yaml`` for the
method's own hyperparameters (solo-learn's values as recalled, not re-read against its files when written); for the
small-image backbone and optimizer, a measurement (issue 13's table, 2-core CPU, Tiny-ImageNet 32 px, kNN at equal
budget): a CIFAR ResNet-20 with AdamW reached kNN 0.394 in 845 s, a ResNet-18 with the ImageNet-scale LARS recipe
0.332 in 682 s, lightly's ResNet-18 SGD recipe 0.353 in 911 s. Methods without their own entry get the stem and the
shared small/large optimizer only (their default backbones stay: untested with ResNet-20). The large-image recipe is
the ImageNet one the method Configs already default to, with the ImageNet stem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ssl_core.views import is_small_image


@dataclass(frozen=True)
class Recipe:
    """``backbone``: the backbone, its stem and the head sizes that go with it (taken as a group, and only when the
    config names no backbone); ``objective``: the method's own hyperparameters (each taken unless the config sets
    it); ``optimizer``: the pretrain section's optimizer, lr, lr_scaling and weight_decay (taken as a group, and only
    when the config sets none of them: an lr is meaningless without its optimizer)."""

    backbone: dict[str, Any] = field(default_factory=dict)
    objective: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)


CNN_BACKBONE_SMALL = "resnet20"
"""He et al. 2016 Sec. 4.2's CIFAR ResNet-20 (0.27M parameters): 8x the images/s of a CIFAR-stem ResNet-18 on a
CPU (issue 13: 172.7 vs 21.4 images/s) and the better encoder at equal budget there."""

PRETRAIN_SMALL: dict[str, Any] = {
    # Measured, not published (issue 13 table; the quickstart's choice): AdamW 4e-3 at batch 128-256, no scaling.
    "optimizer": "adamw", "lr": 0.004, "lr_scaling": "none", "weight_decay": 1e-4,
}
PRETRAIN_LARGE: dict[str, Any] = {
    # SimCLR (Chen et al. 2020a, Sec. B.1 / Table B.1): LARS, lr 0.3 x batch/256, weight decay 1e-6.
    "optimizer": "lars", "lr": 0.3, "lr_scaling": "linear", "weight_decay": 1e-6,
}

HEADS_SMALL: dict[str, dict[str, Any]] = {
    # Heads sized to ResNet-20's 64 features (the papers' 2048-4096 wide heads sit on 512-2048 features).
    "simclr": {"projection_hidden_dim": 512, "projection_dim": 128},  # 128: SimCLR's output dimension
    "moco": {"projection_hidden_dim": 512},
    "byol": {"projection_hidden_dim": 1024, "prediction_hidden_dim": 1024},
    "dino": {"hidden_dim": 1024},
}

OBJECTIVE_SMALL: dict[str, dict[str, Any]] = {
    # SimCLR CIFAR-10 (Chen et al. 2020a, B.9) used 0.5 at batch 256-512; solo-learn's cifar/simclr.yaml uses 0.2;
    # 0.2 here (the quickstart's, better there).
    "simclr": {"temperature": 0.2},
    # MoCo v2 on CIFAR (solo-learn cifar/mocov2plus.yaml): temperature 0.2, momentum 0.99; a 4096-key queue (CIFAR
    # sized: the 65536-key ImageNet queue would hold keys older than an epoch of 50000 images).
    "moco": {"temperature": 0.2, "momentum": 0.99, "queue_size": 4096},
    # BYOL (solo-learn cifar/byol.yaml): base momentum 0.99 (0.996 on ImageNet).
    "byol": {"momentum": 0.99},
    # DINO on CIFAR (solo-learn cifar/dino.yaml): 4096 prototypes, teacher temperature 0.04; 2 local crops (compute).
    "dino": {"out_dim": 4096, "teacher_temperature": 0.04, "num_local_crops": 2},
    # Barlow Twins (Zbontar et al. 2021's code; solo-learn cifar/barlow.yaml): lambda 0.0051.
    "barlow_twins": {"lambda_offdiag": 0.0051},
}

VIT_BACKBONES_PREFIX = "vit"


def recipe(method: str, image_size: int, default_backbone: str = "resnet18") -> Recipe:
    """The recipe of ``method`` at ``image_size`` (see the module docstring). ``default_backbone``: the method's
    Config default; a ViT default (ViT-only methods) is kept, with only the stem flag from the recipe."""
    small = is_small_image(image_size)
    backbone: dict[str, Any] = {"small_images": small}
    if small and not default_backbone.startswith(VIT_BACKBONES_PREFIX) and method in HEADS_SMALL | OBJECTIVE_SMALL:
        backbone = {"backbone": CNN_BACKBONE_SMALL, **backbone, **HEADS_SMALL.get(method, {})}
    objective = dict(OBJECTIVE_SMALL.get(method, {})) if small else {}
    return Recipe(backbone, objective, dict(PRETRAIN_SMALL if small else PRETRAIN_LARGE))
