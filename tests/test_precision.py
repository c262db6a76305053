"""``pretrain.precision``: the training step under bf16 autocast tracks float32 on a fixed seed (no Ray: the step
``pipelines.train_loop`` runs, called directly)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.config import config_from_mapping
from ssl_core import build_method
from ssl_core.optim import build_optimizer
from ssl_core.training import TrainStep, resolve_precision, ssl_objective

STEPS = 3
RELATIVE_TOLERANCE = 0.05
"""bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per value); through a ResNet-8 and NT-Xent, and the updates
of the steps before, the loss of each step stays within 5% of float32's (measured on this seed: 0.4%, 0.5%, 1.6%)."""


def losses(precision: str) -> tuple[list[float], set[torch.dtype]]:
    """Per-step SimCLR losses of ``STEPS`` steps at ``precision`` from seed 0, and the dtypes the convolutions
    produced."""
    torch.manual_seed(0)
    method = build_method("simclr", {"backbone": "resnet8", "image_size": 16, "projection_hidden_dim": 32,
                                     "projection_dim": 16})
    conv_dtypes: set[torch.dtype] = set()
    for module in method.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda _m, _i, output: conv_dtypes.add(output.dtype))
    device = torch.device("cpu")
    optimizer = build_optimizer(method.param_groups(1e-4), "adamw", 1e-3, 1e-4)
    step = TrainStep(method, ssl_objective(method.view_generator(), device), optimizer, lambda _: 1e-3,
                     device=device, what="simclr", precision=precision)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    values = [float(step({"image": images}, index, torch.Generator().manual_seed(index))[0].loss)
              for index in range(STEPS)]
    return values, conv_dtypes


def test_a_bf16_run_tracks_fp32_on_a_fixed_seed() -> None:
    fp32, fp32_dtypes = losses("fp32")
    bf16, bf16_dtypes = losses("bf16")
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}  # autocast really applied
    assert bf16 != fp32  # different arithmetic, so the comparison below is not vacuous
    for step, (reference, value) in enumerate(zip(fp32, bf16)):
        assert value == pytest.approx(reference, rel=RELATIVE_TOLERANCE), f"step {step}"


def test_auto_precision_is_bf16_on_gpus_and_fp32_on_cpus_and_a_bad_one_is_refused() -> None:
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert config_from_mapping({"pretrain": {"precision": "bf16"}}).pretrain.precision == "bf16"
    with pytest.raises(ValueError, match="pretrain.precision"):
        config_from_mapping({"pretrain": {"precision": "fp16"}})
