"""Projection, prediction and DINO heads: thin subclasses of one generic ``MLP``.

Sub-layers are passed in as classes (``norm_layer=nn.BatchNorm1d``, ``activation=nn.ReLU``) and instantiated
per layer, so a head can be re-configured without a new class.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

NormLayer = type[nn.Module]  # called as norm_layer(num_features)
Activation = type[nn.Module]  # called as activation()


def _check_positive(**values: int) -> None:
    for argument, value in values.items():
        if value <= 0:
            raise ValueError(f"{argument} must be > 0, got {value}")


class MLP(nn.Module):
    """``num_layers`` blocks ``Linear -> norm -> activation``; the last block is ``Linear [-> norm]`` only.

    Layer widths: ``in_dim -> hidden_dim -> ... -> hidden_dim -> out_dim`` (``num_layers=1``: ``in_dim -> out_dim``).
    A Linear followed by a norm layer has no bias (the norm cancels it); ``bias`` sets it for the others.
    ``layers`` is an ``nn.Sequential`` of blocks, so ``layers[:1]`` is a module (SimCLRv2 fine-tuning).
    Shape: (batch, in_dim) -> (batch, out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int,
        *,
        norm_layer: NormLayer | None = nn.BatchNorm1d,
        activation: Activation = nn.ReLU,
        last_norm: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim, num_layers=num_layers)
        if last_norm and norm_layer is None:
            raise ValueError("last_norm=True needs a norm_layer")
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        blocks: list[nn.Module] = []
        for index in range(num_layers):
            is_last = index == num_layers - 1
            with_norm = norm_layer is not None and (last_norm or not is_last)
            block: list[nn.Module] = [nn.Linear(widths[index], widths[index + 1], bias=bias and not with_norm)]
            if with_norm:
                block.append(norm_layer(widths[index + 1]))
            if not is_last:
                block.append(activation())
            blocks.append(nn.Sequential(*block))
        self.layers = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def forward_layers(self, x: Tensor) -> list[Tensor]:
        """Output of every block (after its activation); the last element equals ``forward(x)``."""
        outputs = []
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return outputs


class ProjectionHead(MLP):
    """SimCLR projection head g(h) (Chen et al., 2020): ``Linear -> BN -> ReLU -> Linear``.

    SimCLRv2 (Chen et al., 2020b) uses ``num_layers=3, last_norm=True`` (BN on the output, as in its code) and
    fine-tunes from ``layers[:1]``. The same head with ``hidden_dim=4096, out_dim=256`` is BYOL's projector.
    Shape: (batch, in_dim) -> (batch, out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        num_layers: int = 2,
        *,
        last_norm: bool = False,
        norm_layer: NormLayer | None = nn.BatchNorm1d,
        activation: Activation = nn.ReLU,
    ) -> None:
        super().__init__(
            in_dim, hidden_dim, out_dim, num_layers, norm_layer=norm_layer, activation=activation, last_norm=last_norm
        )


class PredictionHead(MLP):
    """BYOL predictor q (Grill et al., 2020): ``Linear -> BN -> ReLU -> Linear``.

    Shape: (batch, in_dim) -> (batch, out_dim).
    """

    def __init__(
        self,
        in_dim: int = 256,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        *,
        norm_layer: NormLayer | None = nn.BatchNorm1d,
        activation: Activation = nn.ReLU,
    ) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, 2, norm_layer=norm_layer, activation=activation)


class DINOHead(MLP):
    """DINO head (Caron et al., 2021): MLP with GELU to a bottleneck, L2-normalise, weight-normalised Linear.

    ``out = W z / ||z||`` with ``z = mlp(x)`` and rows ``W_k = g_k v_k / ||v_k||`` (no bias), ``g`` set to 1 and
    frozen when ``norm_last_layer`` (so every row of ``W`` has unit norm). MLP linears are initialised with a
    truncated normal (std 0.02) and zero bias. ``forward_layers`` returns the MLP blocks' outputs followed by
    the final output. The weight-norm parametrization means this module pickles only through ``state_dict``
    (``copy.deepcopy`` works). Shape: (batch, in_dim) -> (batch, out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
        *,
        norm_layer: NormLayer | None = None,
        activation: Activation = nn.GELU,
    ) -> None:
        super().__init__(in_dim, hidden_dim, bottleneck_dim, num_layers, norm_layer=norm_layer, activation=activation)
        _check_positive(out_dim=out_dim)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def _project(self, bottleneck: Tensor) -> Tensor:
        return self.last_layer(F.normalize(bottleneck, dim=-1, p=2))

    def forward(self, x: Tensor) -> Tensor:
        return self._project(super().forward(x))

    def forward_layers(self, x: Tensor) -> list[Tensor]:
        outputs = super().forward_layers(x)
        outputs.append(self._project(outputs[-1]))
        return outputs


class ConvDecoder(nn.Module):
    """A pooled feature vector to an image-shaped map (context encoder, denoising autoencoder, colorization).

    ``Linear(in_dim -> base_channels x s0 x s0)`` with ``s0 = min(4, output_size)``, then ``Upsample(x2, nearest)
    -> Conv3x3 -> BN -> ReLU`` blocks (channels halving, at least 16) until the side reaches ``output_size``
    (bilinear resize to exactly ``output_size`` when it is not ``s0 * 2**k``), then a ``Conv3x3`` to
    ``out_channels``. The channel-wise fully connected bottleneck of Pathak et al. (2016) reduced to one Linear,
    as our backbones return pooled features.
    Shape: (batch, in_dim) -> (batch, out_channels, output_size, output_size).
    """

    def __init__(self, in_dim: int, out_channels: int, output_size: int, base_channels: int = 64) -> None:
        super().__init__()
        _check_positive(in_dim=in_dim, out_channels=out_channels, output_size=output_size,
                        base_channels=base_channels)
        self.output_size, self.start_size, self.base_channels = output_size, min(4, output_size), base_channels
        self.project = nn.Sequential(nn.Linear(in_dim, base_channels * self.start_size**2), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        size, channels = self.start_size, base_channels
        while size < output_size:
            next_channels = max(16, channels // 2)
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, next_channels, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(next_channels),
                nn.ReLU(inplace=True),
            ]
            size, channels = size * 2, next_channels
        self.upsample = nn.Sequential(*blocks)
        self.predict = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)

    def forward(self, features: Tensor) -> Tensor:
        x = self.project(features).view(features.shape[0], self.base_channels, self.start_size, self.start_size)
        x = self.upsample(x)
        if x.shape[-1] != self.output_size:
            x = F.interpolate(x, size=(self.output_size, self.output_size), mode="bilinear", align_corners=False)
        return self.predict(x)
