"""Colorization (Zhang, Isola & Efros 2016): predict the ab colour channels of Lab from the lightness L.

The encoder sees lightness only, at training time and at every later use: ``method.encoder`` is a
``LightnessEncoder``, which takes the same normalised RGB every other method's encoder takes, undoes the
normalisation, converts to CIE Lab and feeds ``L / 50 - 1`` (in [-1, 1]) replicated to the three input channels of
the backbone. Evaluation, kNN, fine-tuning and distillation call ``method.encoder`` on normalised RGB unchanged; the
colour of their images is simply not seen. (A student distilled from it is an ordinary RGB backbone.)

A ``ConvDecoder`` maps the pooled feature to a ``prediction_size`` map (the paper predicts at a quarter of the
input resolution; our backbones return pooled features, so the decoder restores the spatial layout), and the
target is the ab of the view downsampled (area) to that size:

- ``loss: classification`` (the paper): ``Q`` quantised ab bins (``ssl_core.color.ab_bins``), soft-encoded
  targets (5 nearest bins, sigma 5), class rebalancing ``w ∝ ((1 - mix) p~ + mix / Q)^-1`` where the bin
  prior ``p`` is an exponential moving average (``prior_momentum``) of the soft-encoded targets seen so far (the
  paper measures it once on ImageNet; here it is a buffer of the method's state, checkpointed, updated with the
  mean over all ranks' batches under DDP, so every rank holds the same prior);
  ``loss = sum_pixels w(argmax target) * CE(target, prediction) / pixels``.
- ``loss: regression``: mean squared error on ``ab / 110`` (the simpler option).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_core.augment import Normalization
from ssl_core.color import ab_bins, rebalancing_weights, rgb_to_lab, soft_encode
from ssl_core.distributed import concat_all_gather, is_distributed
from ssl_core.heads import ConvDecoder
from ssl_core.hparams import FieldValueError, bounded
from ssl_core.losses import WeightedSoftCrossEntropy
from ssl_core.methods.base import MethodConfig, SSLMethod, StepOutput, register_method
from ssl_core.views import ViewGenerator, crop_flip_view

AB_SCALE = 110.0


class LightnessEncoder(nn.Module):
    """``backbone(L / 50 - 1, replicated to 3 channels)`` of normalised RGB input (see module docstring).

    Shape: (B, 3, H, W) RGB normalised by ``normalization`` -> (B, feature_dim).
    """

    def __init__(self, backbone: nn.Module, normalization: Normalization) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(backbone.feature_dim)
        self.register_buffer("mean", torch.tensor(normalization.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(normalization.std).view(1, 3, 1, 1), persistent=False)

    def lightness(self, images: Tensor) -> Tensor:
        """The backbone's input: ``L / 50 - 1`` on three channels. Shape: (B, 3, H, W) -> (B, 3, H, W)."""
        rgb = images.float() * self.std + self.mean
        lightness = rgb_to_lab(rgb)[:, :1] / 50.0 - 1.0
        return lightness.expand(-1, 3, -1, -1).to(images.dtype)

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(self.lightness(images))


@dataclass(frozen=True)
class ColorizationConfig(MethodConfig):
    loss: str = bounded("classification", choices=("classification", "regression"))
    bin_size: float = bounded(10.0, 5.0, 40.0)
    rebalance_mix: float = bounded(0.5, 0.0, 1.0)
    prior_momentum: float = bounded(0.99, 0.0, 0.99999)
    prediction_size: int = bounded(8, 2, 256)
    decoder_channels: int = bounded(128, 16, 1024)

    def check(self) -> None:
        super().check()
        if self.prediction_size > self.image_size:
            raise FieldValueError("prediction_size", self.prediction_size,
                                  f"must not exceed image_size={self.image_size}", "ColorizationConfig.prediction_size")


@register_method("colorization")
class Colorization(SSLMethod):
    Config = ColorizationConfig

    def __init__(self, config: ColorizationConfig) -> None:
        super().__init__(config)
        self.encoder = LightnessEncoder(self.build_encoder(), self.normalization())
        classify = config.loss == "classification"
        bins = ab_bins(config.bin_size) if classify else torch.zeros(0, 2)
        self.register_buffer("bins", bins, persistent=False)
        self.register_buffer("ab_prior", torch.full((bins.shape[0],), 1.0 / max(1, bins.shape[0])))
        out_channels = bins.shape[0] if classify else 2
        self.decoder = ConvDecoder(self.encoder.feature_dim, out_channels, config.prediction_size,
                                   config.decoder_channels)
        self.criterion = WeightedSoftCrossEntropy()

    def view_generator(self) -> ViewGenerator:
        """A crop of 60-100% of the image and a flip; colours untouched (they are the target)."""
        return ViewGenerator.single_view(crop_flip_view(self.config.image_size, (0.6, 1.0)))

    def target_ab(self, images: Tensor) -> Tensor:
        """ab of the normalised RGB views, area-downsampled to ``prediction_size``. Shape: -> (B, 2, p, p)."""
        rgb = images.float() * self.encoder.std + self.encoder.mean
        ab = rgb_to_lab(rgb)[:, 1:]
        size = self.config.prediction_size
        return F.interpolate(ab, size=(size, size), mode="area")

    def colour_loss(self, prediction: Tensor, ab: Tensor, update_prior: bool) -> Tensor:
        """The configured loss of decoder output ``prediction`` against target ``ab`` (see module docstring)."""
        c = self.config
        if c.loss == "regression":
            return F.mse_loss(prediction.float(), ab / AB_SCALE)
        target = soft_encode(ab, self.bins)
        if update_prior:
            with torch.no_grad():
                seen = target.mean(dim=(0, 2, 3))
                if is_distributed():  # every rank adds the same, all ranks' mean (DDP would keep rank 0's)
                    seen = concat_all_gather(seen.unsqueeze(0)).mean(0)
                self.ab_prior.mul_(c.prior_momentum).add_(seen, alpha=1.0 - c.prior_momentum)
        weights = rebalancing_weights(self.ab_prior, self.bins, c.rebalance_mix)
        pixel_weight = weights[target.argmax(1)]
        return self.criterion(prediction, target, pixel_weight)

    def training_step(self, views: dict[str, Tensor]) -> StepOutput:
        images = views["view1"]
        prediction = self.decoder(self.encoder(images))
        return StepOutput(self.colour_loss(prediction, self.target_ab(images), update_prior=self.training))
