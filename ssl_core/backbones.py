"""Encoders that map images to pooled features, behind one registry and one factory.

``build_backbone(name, small_images=..., image_size=..., **kwargs)`` returns an ``nn.Module`` with an int
attribute ``feature_dim`` whose ``forward`` maps float images to pooled features.
Shape: (batch, 3, height, width) -> (batch, feature_dim).

- ``resnet18``, ``resnet34``, ``resnet50``: torchvision ResNets, randomly initialised (never downloaded), with
  ``fc`` replaced by ``nn.Identity``. ``small_images=True`` swaps the 7x7 stride-2 stem and its max-pool for a
  3x3 stride-1 convolution and no pooling, the CIFAR/STL setup of SimCLR (Chen et al., 2020, Appendix B.9).
  ``image_size`` does not change a ResNet; extra keyword arguments go to the torchvision constructor.
- ``resnet8``, ``resnet20``, ``resnet32``, ``resnet56``: the CIFAR ResNets of He et al. (2016, Sec. 4.2): a 3x3
  stem, three stages of ``n`` basic blocks (``depth = 6n + 2``) with 16, 32, 64 channels (times ``width``), 64 x
  ``width`` features. 40x to 500x cheaper than ResNet-18 at 32 px: the backbones for CPU runs and small students.
  They always use the small-image stem, so ``small_images`` has no effect.
- ``vit_tiny`` (192 wide, 12 blocks, 3 heads), ``vit_small`` (384, 12, 6): a pre-norm Vision Transformer
  (Dosovitskiy et al., 2021) with a CLS token and fixed 2D sin-cos position embeddings, initialised as in MAE
  (He et al., 2022). Keyword arguments: ``patch_size`` (default 4 for ``image_size <= 64``, else 16), ``depth``
  and ``pool`` (the feature: ``"cls"``, the CLS token, default; ``"mean"``, the mean of the patch tokens, both
  after the final LayerNorm). It encodes any input whose sides are multiples of the patch size (DINO's local
  crops): the position embeddings are interpolated bicubically to the input's patch grid, the CLS row kept, as
  in DINO's reference code. The patch size sets the stem, so ``small_images`` has no effect on a ViT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ssl_core.registry import Registry

BackboneFactory = Callable[..., nn.Module]

BACKBONES: Registry[BackboneFactory] = Registry("backbone")


def build_backbone(name: str, *, small_images: bool = False, image_size: int = 32, **kwargs: Any) -> nn.Module:
    """Build the registered backbone ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    factory = BACKBONES.get(name)
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")
    return factory(small_images=small_images, image_size=image_size, **kwargs)


def available_backbones() -> list[str]:
    """Names accepted by ``build_backbone``."""
    return BACKBONES.names()


# --------------------------------------------------------------------------------------------------- ResNets


def _resnet(
    constructor: Callable[..., torchvision.models.ResNet], *, small_images: bool, **kwargs: Any
) -> torchvision.models.ResNet:
    model = constructor(weights=None, **kwargs)
    if small_images:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's stem
        model.maxpool = nn.Identity()
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


@BACKBONES.register("resnet18")
def resnet18(*, small_images: bool = False, image_size: int = 32, **kwargs: Any) -> nn.Module:
    """ResNet-18, 512 features."""
    return _resnet(torchvision.models.resnet18, small_images=small_images, **kwargs)


@BACKBONES.register("resnet34")
def resnet34(*, small_images: bool = False, image_size: int = 32, **kwargs: Any) -> nn.Module:
    """ResNet-34, 512 features."""
    return _resnet(torchvision.models.resnet34, small_images=small_images, **kwargs)


@BACKBONES.register("resnet50")
def resnet50(*, small_images: bool = False, image_size: int = 32, **kwargs: Any) -> nn.Module:
    """ResNet-50, 2048 features."""
    return _resnet(torchvision.models.resnet50, small_images=small_images, **kwargs)


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet with torchvision basic blocks and 1x1 projection shortcuts (option B).

    Shape: (B, 3, H, W) -> (B, 64 * width).
    """

    def __init__(self, blocks_per_stage: int, width: int = 1) -> None:
        super().__init__()
        if blocks_per_stage < 1 or width < 1:
            raise ValueError(f"blocks_per_stage={blocks_per_stage} and width={width} must be >= 1")
        channels = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        in_channels = channels[0]
        for stage, out_channels in enumerate(channels):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                downsample = None
                if stride != 1 or in_channels != out_channels:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                        nn.BatchNorm2d(out_channels),
                    )
                layers.append(torchvision.models.resnet.BasicBlock(in_channels, out_channels, stride, downsample))
                in_channels = out_channels
        self.stages = nn.Sequential(*layers)
        self.feature_dim = channels[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> Tensor:
        return self.stages(self.stem(images)).mean(dim=(2, 3))


def _register_cifar_resnet(depth: int) -> None:
    def factory(*, small_images: bool = False, image_size: int = 32, width: int = 1) -> nn.Module:
        return CifarResNet((depth - 2) // 6, width)

    factory.__doc__ = f"CIFAR ResNet-{depth} ({(depth - 2) // 6} blocks per stage), 64 x width features."
    BACKBONES.register(f"resnet{depth}")(factory)


for _depth in (8, 20, 32, 56):
    _register_cifar_resnet(_depth)


# ------------------------------------------------------------------------------------------ Vision Transformer


def sincos_position_embedding_2d(embed_dim: int, grid_size: int) -> Tensor:
    """Fixed 2D sin-cos position embeddings of a square patch grid, in MAE's layout (no CLS row).

    For patch ``n = row * grid_size + col`` and ``omega_k = 10000 ** (-k / (embed_dim / 4))``:
    ``[sin(col * omega), cos(col * omega), sin(row * omega), cos(row * omega)]``, each block ``embed_dim / 4``
    wide. Shape: (grid_size ** 2, embed_dim).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for 2D sin-cos embeddings, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(positions: Tensor) -> Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``. Shape: (batch, tokens, dim)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim)
        x = F.scaled_dot_product_attention(query, key, value)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``. Shape: (batch, tokens, dim)."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden_dim = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


VIT_POOLS = ("cls", "mean")


class VisionTransformer(nn.Module):
    """ViT encoder: its feature is the CLS token (``pool="cls"``) or the mean of the patch tokens (``pool="mean"``),
    after the final LayerNorm. Shape: (B, 3, H, W) -> (B, embed_dim), ``H`` and ``W`` multiples of ``patch_size``.

    Patches are numbered row-major (``n = row * grid_width + col``); ``patchify`` flattens each patch as
    (row-in-patch, col-in-patch, channel), as MAE does. ``pos_embed`` is a fixed buffer of shape
    (1, 1 + num_patches, embed_dim) whose CLS row is zero, for the ``image_size`` grid; an input of another size
    gets it interpolated to its own grid (``position_embedding``).
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        for argument, value in (("image_size", image_size), ("patch_size", patch_size), ("depth", depth)):
            if value <= 0:
                raise ValueError(f"{argument} must be > 0, got {value}")
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
        if pool not in VIT_POOLS:
            raise ValueError(f"pool={pool!r} must be one of {list(VIT_POOLS)}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.embed_dim = embed_dim
        self.feature_dim = embed_dim
        self.pool = pool

        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos_embed = torch.cat([torch.zeros(1, embed_dim), sincos_position_embedding_2d(embed_dim, self.grid_size)])
        self.register_buffer("pos_embed", pos_embed.unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(TransformerBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE init: patch embedding and linears xavier-uniform (zero bias), CLS ~ N(0, 0.02), LayerNorm (1, 0)."""
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.embed_dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def patch_grid(self, images: Tensor) -> tuple[int, int]:
        """``(rows, cols)`` of the patch grid of ``images``; raises unless they are (B, 3, H, W) with ``H`` and
        ``W`` multiples of ``patch_size``."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % self.patch_size or \
                images.shape[3] % self.patch_size:
            raise ValueError(
                f"expected images of shape (batch, 3, H, W) with H and W multiples of patch_size={self.patch_size}, "
                f"got {tuple(images.shape)}"
            )
        return images.shape[2] // self.patch_size, images.shape[3] // self.patch_size

    def _check_full_size(self, images: Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (batch, {', '.join(map(str, expected))}), got {tuple(images.shape)}"
            )

    def position_embedding(self, rows: int, cols: int) -> Tensor:
        """Position embeddings of a ``rows x cols`` patch grid: the stored table at its own grid, else its patch rows
        resized bicubically (``align_corners=False``) to the grid, the CLS row kept (DINO's
        ``interpolate_pos_encoding``). Shape: -> (1, 1 + rows * cols, embed_dim)."""
        if (rows, cols) == (self.grid_size, self.grid_size):
            return self.pos_embed
        table = self.pos_embed[:, 1:].reshape(1, self.grid_size, self.grid_size, self.embed_dim).permute(0, 3, 1, 2)
        resized = F.interpolate(table, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def patchify(self, images: Tensor) -> Tensor:
        """Split images into flattened patches. Shape: (B, 3, H, W) -> (B, num_patches, patch_size**2 * 3)."""
        self._check_full_size(images)
        p, g = self.patch_size, self.grid_size
        patches = images.reshape(images.shape[0], 3, g, p, g, p)
        return torch.einsum("bchpwq->bhwpqc", patches).reshape(images.shape[0], g * g, p * p * 3)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """Inverse of ``patchify``. Shape: (B, num_patches, patch_size**2 * 3) -> (B, 3, H, W)."""
        p, g = self.patch_size, self.grid_size
        if patches.ndim != 3 or tuple(patches.shape[1:]) != (self.num_patches, p * p * 3):
            raise ValueError(
                f"expected patches of shape (batch, {self.num_patches}, {p * p * 3}), got {tuple(patches.shape)}"
            )
        images = patches.reshape(patches.shape[0], g, g, p, p, 3)
        return torch.einsum("bhwpqc->bchpwq", images).reshape(patches.shape[0], 3, g * p, g * p)

    def embed_patches(
        self, images: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Patch tokens plus their position embeddings, and the CLS position row. With ``mask`` (B, n) bool and
        ``mask_token`` (embed_dim,), a masked patch's token is replaced by ``mask_token`` before the position
        embedding is added (iBOT, MaskFeat, SimMIM). Shape: (B, 3, H, W) -> (B, n, embed_dim), (1, 1, embed_dim)."""
        rows, cols = self.patch_grid(images)
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)
        if mask is not None:
            if mask_token is None or mask.shape != tokens.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be a bool tensor of shape {tuple(tokens.shape[:2])} with a mask_token, got "
                    f"{mask.dtype} {tuple(mask.shape)}"
                )
            tokens = torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype).view(1, 1, -1), tokens)
        pos = self.position_embedding(rows, cols)
        return tokens + pos[:, 1:], pos[:, :1]

    def _encode(self, patch_tokens: Tensor, cls_pos: Tensor) -> Tensor:
        """Prepend the CLS token, run the blocks and the final norm. Shape: (B, n, D) -> (B, 1 + n, D)."""
        cls = (self.cls_token + cls_pos).expand(patch_tokens.shape[0], -1, -1)
        x = torch.cat([cls, patch_tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_tokens(self, images: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """Every output token after the final norm, CLS first; ``mask`` / ``mask_token`` as in ``embed_patches``.
        Shape: (B, 3, H, W) -> (B, 1 + n, embed_dim)."""
        return self._encode(*self.embed_patches(images, mask, mask_token))

    def forward_visible(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        """Encode only the patches ``ids_keep`` (MAE's encoder); position embeddings are added before selection.

        Shape: images (B, 3, H, W), ids_keep (B, n_keep) int64 -> tokens (B, 1 + n_keep, embed_dim), CLS first.
        """
        if ids_keep.ndim != 2 or ids_keep.shape[0] != images.shape[0] or ids_keep.dtype != torch.long:
            raise ValueError(
                f"ids_keep must be an int64 tensor of shape (batch={images.shape[0]}, n_keep), "
                f"got {ids_keep.dtype} {tuple(ids_keep.shape)}"
            )
        tokens, cls_pos = self.embed_patches(images)
        kept = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, self.embed_dim))
        return self._encode(kept, cls_pos)

    def pooled(self, tokens: Tensor) -> Tensor:
        """The feature of ``forward_tokens``' output: the CLS token or the mean patch token (``pool``)."""
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.pooled(self.forward_tokens(images))


def _vit(
    *, image_size: int, embed_dim: int, num_heads: int, patch_size: int | None, depth: int, pool: str
) -> VisionTransformer:
    if patch_size is None:
        patch_size = default_vit_patch_size(image_size)
    return VisionTransformer(
        image_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, pool=pool
    )


def default_vit_patch_size(image_size: int) -> int:
    """The patch size ``vit_*`` use when none is given: 4 up to 64 px, else 16."""
    return 4 if image_size <= 64 else 16


@BACKBONES.register("vit_tiny")
def vit_tiny(
    *, small_images: bool = False, image_size: int = 32, patch_size: int | None = None, depth: int = 12,
    pool: str = "cls",
) -> nn.Module:
    """ViT-Tiny: 192 wide, 3 heads, 12 blocks by default."""
    return _vit(image_size=image_size, embed_dim=192, num_heads=3, patch_size=patch_size, depth=depth, pool=pool)


@BACKBONES.register("vit_small")
def vit_small(
    *, small_images: bool = False, image_size: int = 32, patch_size: int | None = None, depth: int = 12,
    pool: str = "cls",
) -> nn.Module:
    """ViT-Small: 384 wide, 6 heads, 12 blocks by default."""
    return _vit(image_size=image_size, embed_dim=384, num_heads=6, patch_size=patch_size, depth=depth, pool=pool)
