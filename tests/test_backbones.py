"""Backbones: registry-wide interface tests, the small-image stem, and the ViT's MAE interface."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_core.backbones import BACKBONES, VisionTransformer, build_backbone, sincos_position_embedding_2d


def tiny_kwargs(name: str) -> dict:
    """Small but complete versions of each registered backbone."""
    if name.startswith("vit"):
        return {"image_size": 16, "depth": 2}
    return {"image_size": 16, "small_images": True}


@pytest.mark.parametrize("name", BACKBONES.names())
def test_registered_backbone_interface(name: str) -> None:
    torch.manual_seed(0)
    kwargs = tiny_kwargs(name)
    model = build_backbone(name, **kwargs)
    images = torch.randn(2, 3, kwargs["image_size"], kwargs["image_size"])
    features = model(images)
    assert isinstance(model.feature_dim, int)
    assert features.shape == (2, model.feature_dim)
    assert torch.isfinite(features).all()
    features.sum().backward()
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name}.{param_name} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{name}.{param_name} has a non-finite gradient"


def test_registry_lists_expected_backbones() -> None:
    assert set(BACKBONES.names()) == {
        "resnet8", "resnet20", "resnet32", "resnet56", "resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small"
    }


@pytest.mark.parametrize(("name", "blocks"), [("resnet8", 1), ("resnet20", 3), ("resnet56", 9)])
def test_cifar_resnet_depth_and_width(name: str, blocks: int) -> None:
    model = build_backbone(name, width=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 6 * blocks + 1  # 6n 3x3 convs in the blocks + the stem; with the fc: depth 6n + 2
    assert model.feature_dim == 128
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_feature_dims() -> None:
    assert build_backbone("resnet18").feature_dim == 512
    assert build_backbone("resnet50").feature_dim == 2048
    assert build_backbone("vit_tiny", depth=1).feature_dim == 192
    assert build_backbone("vit_small", depth=1).feature_dim == 384


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(KeyError) as error:
        build_backbone("resnet1000")
    for name in BACKBONES.names():
        assert name in str(error.value)


def test_unknown_keyword_is_rejected() -> None:
    with pytest.raises(TypeError):
        build_backbone("vit_tiny", dpeth=2)


def layer4_spatial_size(small_images: bool) -> tuple[int, int]:
    model = build_backbone("resnet18", small_images=small_images)
    shapes = []
    model.layer4.register_forward_hook(lambda module, inputs, output: shapes.append(output.shape))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    return tuple(shapes[0][2:])


def test_small_images_stem_keeps_resolution() -> None:
    assert layer4_spatial_size(small_images=True) == (4, 4)
    assert layer4_spatial_size(small_images=False) == (1, 1)
    model = build_backbone("resnet18", small_images=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert isinstance(model.fc, nn.Identity)


def test_vit_patch_size_default_and_validation() -> None:
    assert build_backbone("vit_tiny", image_size=32, depth=1).patch_size == 4
    assert build_backbone("vit_tiny", image_size=96, depth=1).patch_size == 16
    with pytest.raises(ValueError, match=r"image_size=30.*patch_size=4"):
        build_backbone("vit_tiny", image_size=30, depth=1)
    model = build_backbone("vit_tiny", image_size=16, depth=1)
    with pytest.raises(ValueError, match=r"shape \(batch, 3, H, W\) with H and W multiples of patch_size=4"):
        model(torch.randn(2, 3, 30, 30))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"pool='max' must be one of \['cls', 'mean'\]"):
        build_backbone("vit_tiny", image_size=16, depth=1, pool="max")


def test_position_embedding_matches_mae_formula() -> None:
    embed_dim, grid_size = 8, 3
    table = sincos_position_embedding_2d(embed_dim, grid_size)
    assert table.shape == (grid_size**2, embed_dim)
    quarter = embed_dim // 4
    for row in range(grid_size):
        for col in range(grid_size):
            expected = []
            for position in (col, row):
                angles = [position / 10000 ** (k / quarter) for k in range(quarter)]
                expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
            torch.testing.assert_close(table[row * grid_size + col], torch.tensor(expected))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding_2d(6, 2)


@pytest.fixture
def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return build_backbone("vit_tiny", image_size=16, depth=2).eval()


def test_patchify_matches_naive_loop_and_round_trips(vit: VisionTransformer) -> None:
    images = torch.randn(2, 3, 16, 16)
    patches = vit.patchify(images)
    p, grid = vit.patch_size, vit.grid_size
    assert patches.shape == (2, vit.num_patches, p * p * 3)
    for row in range(grid):
        for col in range(grid):
            block = images[:, :, row * p : (row + 1) * p, col * p : (col + 1) * p]  # (B, C, p, p)
            expected = block.permute(0, 2, 3, 1).reshape(2, -1)  # (row-in-patch, col-in-patch, channel)
            assert torch.equal(patches[:, row * grid + col], expected)
    assert torch.equal(vit.unpatchify(patches), images)


def test_forward_visible_with_all_patches_equals_forward(vit: VisionTransformer) -> None:
    images = torch.randn(2, 3, 16, 16)
    ids_keep = torch.arange(vit.num_patches).expand(2, -1)
    tokens = vit.forward_visible(images, ids_keep)
    assert tokens.shape == (2, 1 + vit.num_patches, vit.embed_dim)
    torch.testing.assert_close(tokens[:, 0], vit(images))


def test_forward_visible_subset_is_order_equivariant(vit: VisionTransformer) -> None:
    images = torch.randn(2, 3, 16, 16)
    ids_keep = torch.stack([torch.randperm(vit.num_patches)[:4] for _ in range(2)])
    tokens = vit.forward_visible(images, ids_keep)
    assert tokens.shape == (2, 5, vit.embed_dim)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = vit.forward_visible(images, ids_keep[:, order])
    torch.testing.assert_close(shuffled[:, 0], tokens[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shuffled[:, 1:], tokens[:, 1:][:, order], rtol=1e-4, atol=1e-5)


def test_forward_visible_ignores_dropped_patches(vit: VisionTransformer) -> None:
    images = torch.randn(1, 3, 16, 16)
    ids_keep = torch.tensor([[0, 5, 10, 15]])
    reference = vit.forward_visible(images, ids_keep)
    changed_dropped = images.clone()
    changed_dropped[:, :, 0:4, 4:8] += 1.0  # patch 1, not kept
    torch.testing.assert_close(vit.forward_visible(changed_dropped, ids_keep), reference)
    changed_kept = images.clone()
    changed_kept[:, :, 4:8, 4:8] += 1.0  # patch 5, kept
    assert not torch.allclose(vit.forward_visible(changed_kept, ids_keep), reference)


def test_forward_visible_rejects_bad_ids(vit: VisionTransformer) -> None:
    images = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="ids_keep"):
        vit.forward_visible(images, torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="ids_keep"):
        vit.forward_visible(images, torch.zeros(3, 4, dtype=torch.long))


def test_vit_init_and_fixed_position_embedding(vit: VisionTransformer) -> None:
    assert "pos_embed" not in dict(vit.named_parameters())
    assert torch.equal(vit.pos_embed[0, 0], torch.zeros(vit.embed_dim))
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in vit.modules() if isinstance(m, nn.Linear))
    bound = math.sqrt(6 / (vit.embed_dim + 4 * vit.embed_dim))  # xavier-uniform bound of the first MLP linear
    assert vit.blocks[0].mlp[0].weight.abs().max() <= bound


# ------------------------------------------------------------------- ViT on other input sizes, pooling, masking


def _cubic_weight(distance: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    d = abs(distance)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def _naive_bicubic(grid: torch.Tensor, out_rows: int, out_cols: int) -> torch.Tensor:
    """Bicubic resize of (rows, cols, dim) with half-pixel centres and clamped borders, one output at a time."""
    rows, cols, _ = grid.shape
    out = torch.zeros(out_rows, out_cols, grid.shape[2], dtype=torch.float64)
    for i in range(out_rows):
        y = (i + 0.5) * rows / out_rows - 0.5
        for j in range(out_cols):
            x = (j + 0.5) * cols / out_cols - 0.5
            for m in range(math.floor(y) - 1, math.floor(y) + 3):
                for n in range(math.floor(x) - 1, math.floor(x) + 3):
                    weight = _cubic_weight(y - m) * _cubic_weight(x - n)
                    out[i, j] += weight * grid[min(max(m, 0), rows - 1), min(max(n, 0), cols - 1)].double()
    return out


def test_position_embedding_is_interpolated_bicubically_to_the_input_grid(vit: VisionTransformer) -> None:
    assert vit.position_embedding(vit.grid_size, vit.grid_size) is vit.pos_embed
    table = vit.pos_embed[0, 1:].reshape(vit.grid_size, vit.grid_size, -1)
    for rows, cols in ((2, 2), (3, 5), (6, 6)):
        resized = vit.position_embedding(rows, cols)
        assert resized.shape == (1, 1 + rows * cols, vit.embed_dim)
        assert torch.equal(resized[0, 0], vit.pos_embed[0, 0])  # the CLS row is kept
        expected = _naive_bicubic(table, rows, cols).reshape(rows * cols, -1).float()
        torch.testing.assert_close(resized[0, 1:], expected, rtol=1e-4, atol=1e-5)


def test_vit_encodes_crops_smaller_and_larger_than_its_image_size(vit: VisionTransformer) -> None:
    for side in (8, 12, 24):
        images = torch.randn(2, 3, side, side)
        tokens = vit.forward_tokens(images)
        assert tokens.shape == (2, 1 + (side // 4) ** 2, vit.embed_dim)
        torch.testing.assert_close(vit(images), tokens[:, 0])
        # the interpolated table is what the patches get: the same as feeding it through the encoder by hand
        patches = vit.patch_embed(images).flatten(2).transpose(1, 2)
        position = vit.position_embedding(side // 4, side // 4)
        torch.testing.assert_close(tokens, vit._encode(patches + position[:, 1:], position[:, :1]))


def test_mean_pool_is_the_mean_patch_token() -> None:
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", image_size=16, depth=1, pool="mean")
    images = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(model(images), model.forward_tokens(images)[:, 1:].mean(dim=1))


def test_masked_patches_are_replaced_by_the_mask_token(vit: VisionTransformer) -> None:
    images = torch.randn(2, 3, 16, 16)
    mask_token = torch.randn(vit.embed_dim)
    no_mask = torch.zeros(2, vit.num_patches, dtype=torch.bool)
    torch.testing.assert_close(vit.forward_tokens(images, no_mask, mask_token), vit.forward_tokens(images))
    mask = no_mask.clone()
    mask[:, 5] = True  # patch 5: rows 4-7, cols 4-7
    tokens, _ = vit.embed_patches(images, mask, mask_token)
    torch.testing.assert_close(tokens[:, 5], mask_token + vit.pos_embed[0, 6].expand(2, -1))
    changed = images.clone()
    changed[:, :, 4:8, 4:8] += 1.0  # only the masked patch's pixels change: nothing the encoder sees changes
    masked = vit.forward_tokens(images, mask, mask_token)
    torch.testing.assert_close(vit.forward_tokens(changed, mask, mask_token), masked)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        vit.forward_tokens(images, mask.float(), mask_token)
