"""Numerics of the batched view generators against naive per-sample / per-pixel references, plus properties."""

from __future__ import annotations

import colorsys
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_core.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewConfig,
    augment_view,
    color_jitter,
    gaussian_blur,
    normalize,
    random_masking,
    resized_crop,
    to_float_image,
)
from ssl_core.views import ViewGenerator, byol_views, dino_views, local_crop_size, simclr_views

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LUMA = (0.299, 0.587, 0.114)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uint8_images(batch: int = 4, size: int = 16, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=seeded(seed))


def plain_config(output_size: int, **overrides: object) -> ViewConfig:
    """A view that only crops: full-image box, no flip, no colour ops, no normalisation."""
    settings: dict[str, object] = dict(
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        hflip_prob=0.0,
        jitter_prob=0.0,
        grayscale_prob=0.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    settings.update(overrides)
    return ViewConfig(output_size, **settings)


# ---------------------------------------------------------------- shapes, dtype, range, device, determinism


@pytest.mark.parametrize("device", DEVICES)
def test_views_have_shape_dtype_and_device(device: str) -> None:
    images = uint8_images(batch=4, size=32).to(device)
    views = simclr_views(32)(images, seeded())
    assert set(views) == {"view1", "view2"}
    for view in views.values():
        assert view.shape == (4, 3, 32, 32)
        assert view.dtype == torch.float32
        assert view.device == images.device
        assert torch.isfinite(view).all()


def test_values_lie_within_normalisation_bounds() -> None:
    cfg = ViewConfig(16, blur_prob=0.5, solarize_prob=0.5)
    view = augment_view(uint8_images(batch=8), cfg, seeded())
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert (view >= (0.0 - mean) / std - 1e-5).all()
    assert (view <= (1.0 - mean) / std + 1e-5).all()


def test_uint8_and_float_inputs_give_the_same_views() -> None:
    images = uint8_images(batch=4)
    cfg = ViewConfig(16, blur_prob=0.5, solarize_prob=0.5)
    from_uint8 = augment_view(images, cfg, seeded(3))
    from_float = augment_view(images.float() / 255.0, cfg, seeded(3))
    torch.testing.assert_close(from_uint8, from_float, rtol=0, atol=1e-6)


def test_same_seed_gives_identical_views_and_different_seeds_differ() -> None:
    images = uint8_images(batch=4)
    generator = byol_views(16)
    first, again, other = generator(images, seeded(1)), generator(images, seeded(1)), generator(images, seeded(2))
    for name in first:
        assert torch.equal(first[name], again[name])
        assert not torch.allclose(first[name], other[name])
    assert not torch.allclose(first["view1"], first["view2"])


def test_each_sample_gets_its_own_parameters() -> None:
    image = uint8_images(batch=1)
    view = augment_view(image.repeat(2, 1, 1, 1), ViewConfig(16), seeded())
    assert not torch.allclose(view[0], view[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_the_same_views_on_cuda() -> None:
    images = uint8_images(batch=4)
    cfg = ViewConfig(16, blur_prob=0.5, solarize_prob=0.5)
    on_cpu = augment_view(images, cfg, seeded(5))
    on_cuda = augment_view(images.cuda(), cfg, seeded(5))
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=0, atol=1e-4)


def test_one_channel_input_is_repeated_to_three() -> None:
    gray = uint8_images(batch=3, channels=1)
    cfg = ViewConfig(16)
    torch.testing.assert_close(
        augment_view(gray, cfg, seeded()), augment_view(gray.repeat(1, 3, 1, 1), cfg, seeded()), rtol=0, atol=0
    )


# ---------------------------------------------------------------- geometry


def test_full_crop_reproduces_the_input_and_its_resize() -> None:
    images = to_float_image(uint8_images(batch=2, size=16))
    torch.testing.assert_close(augment_view(images, plain_config(16)), images, rtol=0, atol=1e-5)
    for size in (8, 24):
        resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        torch.testing.assert_close(augment_view(images, plain_config(size)), resized, rtol=0, atol=1e-5)


def test_flip_exactly_mirrors() -> None:
    images = to_float_image(uint8_images(batch=2, size=16))
    flipped = augment_view(images, plain_config(16, hflip_prob=1.0))
    torch.testing.assert_close(flipped, images.flip(-1), rtol=0, atol=1e-5)


def test_integer_boxes_crop_exactly_like_slicing() -> None:
    images = torch.rand(3, 3, 12, 10, generator=seeded())
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [3.0, 4.0, 5.0, 5.0], [5.0, 7.0, 5.0, 5.0]])  # (x0, y0, w, h)
    flip = torch.tensor([False, True, False])
    cropped = resized_crop(images, boxes, flip, 5)
    for i in range(3):  # naive reference: slice each sample, mirror if asked
        x0, y0, w, h = (int(v) for v in boxes[i])
        expected = images[i, :, y0 : y0 + h, x0 : x0 + w]
        expected = expected.flip(-1) if flip[i] else expected
        torch.testing.assert_close(cropped[i], expected, rtol=0, atol=1e-5)


def test_crop_boxes_lie_inside_the_image_with_the_sampled_area_and_ratio() -> None:
    from ssl_core.augment import _crop_boxes  # the sampler itself: the views cannot show where a box lies

    height, width = 12, 20
    cfg = ViewConfig(8, crop_scale=(0.1, 0.9), crop_ratio=(0.5, 2.0))
    draws = torch.rand(2000, 14, generator=seeded())
    corners = [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    draws[:4, :4] = torch.tensor(corners)
    x0, y0, w, h = _crop_boxes(draws, height, width, cfg).unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= width + 1e-4).all() and (y0 + h <= height + 1e-4).all()
    unclamped = (w < width) & (h < height)
    area, ratio = (w * h / (height * width))[unclamped], (w / h)[unclamped]
    assert unclamped.float().mean() > 0.5
    assert (area >= 0.1 - 1e-5).all() and (area <= 0.9 + 1e-5).all()
    assert (ratio >= 0.5 - 1e-5).all() and (ratio <= 2.0 + 1e-5).all()


# ---------------------------------------------------------------- colour


def naive_jitter(
    image: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """Per-pixel reference: torchvision's blend formulas, and colorsys for the hue rotation."""
    _, height, width = image.shape
    pixels = [[float(v) for v in image[:, y, x]] for y in range(height) for x in range(width)]

    def clamp(value: float) -> float:
        return min(max(value, 0.0), 1.0)

    def luma(pixel: list[float]) -> float:
        return sum(weight * value for weight, value in zip(LUMA, pixel))

    pixels = [[clamp(brightness * v) for v in p] for p in pixels]
    mean = sum(luma(p) for p in pixels) / len(pixels)
    pixels = [[clamp(contrast * v + (1 - contrast) * mean) for v in p] for p in pixels]
    pixels = [[clamp(saturation * v + (1 - saturation) * luma(p)) for v in p] for p in pixels]
    rotated = []
    for pixel in pixels:
        h, s, v = colorsys.rgb_to_hsv(*pixel)
        rotated.append(colorsys.hsv_to_rgb((h + hue) % 1.0, s, v))
    return torch.tensor(rotated).T.reshape(3, height, width)


def test_color_jitter_matches_naive_reference() -> None:
    images = torch.rand(4, 3, 5, 4, generator=seeded())
    images[0, :, 0, 0] = 0.5  # a gray pixel (zero chroma)
    brightness = torch.tensor([1.3, 0.7, 1.0, 0.9])
    contrast = torch.tensor([0.6, 1.4, 1.0, 1.2])
    saturation = torch.tensor([1.5, 0.2, 1.0, 0.8])
    hue = torch.tensor([0.1, -0.1, 0.0, 0.45])
    jittered = color_jitter(images, brightness, contrast, saturation, hue)
    for i in range(4):
        expected = naive_jitter(images[i], *(float(f[i]) for f in (brightness, contrast, saturation, hue)))
        torch.testing.assert_close(jittered[i], expected, rtol=0, atol=1e-5)


def test_grayscale_output_has_equal_channels_with_luma() -> None:
    images = to_float_image(uint8_images(batch=3))
    gray = augment_view(images, plain_config(16, grayscale_prob=1.0))
    luma = sum(w * images[:, c] for c, w in enumerate(LUMA))
    for c in range(3):
        torch.testing.assert_close(gray[:, c], luma, rtol=0, atol=1e-5)


def test_solarize_inverts_only_bright_values() -> None:
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    images[:, :, :, :4] = 192  # >= 0.5: becomes 1 - 192/255
    images[:, :, :, 4:] = 64  # < 0.5: unchanged
    view = augment_view(images, plain_config(8, solarize_prob=1.0))
    torch.testing.assert_close(view[..., :4], torch.full_like(view[..., :4], 1 - 192 / 255), rtol=0, atol=1e-6)
    torch.testing.assert_close(view[..., 4:], torch.full_like(view[..., 4:], 64 / 255), rtol=0, atol=1e-6)


def naive_blur(image: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    """Per-pixel 2D Gaussian with reflect padding."""
    channels, height, width = image.shape
    half = kernel_size // 2
    unnormalised = {offset: math.exp(-0.5 * (offset / sigma) ** 2) for offset in range(-half, half + 1)}
    weights = {offset: w / sum(unnormalised.values()) for offset, w in unnormalised.items()}

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    out = torch.empty_like(image)
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                out[c, y, x] = sum(
                    weights[dy] * weights[dx] * float(image[c, reflect(y + dy, height), reflect(x + dx, width)])
                    for dy in range(-half, half + 1)
                    for dx in range(-half, half + 1)
                )
    return out


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_gaussian_blur_matches_naive_reference(kernel_size: int) -> None:
    images = torch.rand(2, 3, 6, 7, generator=seeded())
    sigma = torch.tensor([0.5, 1.7])
    blurred = gaussian_blur(images, sigma, kernel_size)
    for i in range(2):
        torch.testing.assert_close(blurred[i], naive_blur(images[i], float(sigma[i]), kernel_size), rtol=0, atol=1e-5)


def test_normalize_is_per_channel_standardisation() -> None:
    images = torch.rand(2, 3, 4, 4, generator=seeded())
    out = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (images[:, c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c])


# ---------------------------------------------------------------- masking


def test_random_masking_keeps_the_right_count_and_restores_order() -> None:
    batch, num_patches, ratio = 5, 16, 0.75
    ids_keep, mask, ids_restore = random_masking(batch, num_patches, ratio, seeded(), "cpu")
    num_keep = round(num_patches * (1 - ratio))
    assert ids_keep.shape == (batch, num_keep) and mask.shape == ids_restore.shape == (batch, num_patches)
    assert (mask.sum(1) == num_patches - num_keep).all()
    for b in range(batch):  # naive check: the kept ids are exactly the unmasked positions
        assert sorted(ids_keep[b].tolist()) == [n for n in range(num_patches) if mask[b, n] == 0]
    # MAE's decoder use: kept tokens followed by mask tokens (-1), unshuffled by ids_restore, land in place.
    patches = torch.arange(num_patches).expand(batch, -1)
    mask_tokens = torch.full((batch, num_patches - num_keep), -1)
    kept_then_masked = torch.cat([torch.gather(patches, 1, ids_keep), mask_tokens], 1)
    restored = torch.gather(kept_then_masked, 1, ids_restore)
    assert torch.equal(restored, torch.where(mask == 0, patches, -1))
    assert not torch.equal(ids_keep[0], ids_keep[1])  # per-sample permutations
    assert torch.equal(random_masking(batch, num_patches, ratio, seeded(), "cpu")[0], ids_keep)


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_random_masking_rejects_bad_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 16, ratio, seeded())


# ---------------------------------------------------------------- generators, recipes, validation


def test_multi_crop_keys_and_sizes() -> None:
    generator = ViewGenerator.multi_crop(ViewConfig(16), ViewConfig(8, crop_scale=(0.05, 0.4)), num_local=3)
    views = generator(uint8_images(batch=2, size=20), seeded())
    assert list(views) == ["global_0", "global_1", "local_0", "local_1", "local_2"]
    assert all(views[f"global_{i}"].shape == (2, 3, 16, 16) for i in range(2))
    assert all(views[f"local_{i}"].shape == (2, 3, 8, 8) for i in range(3))


def test_dino_recipe_is_asymmetric_with_small_local_crops() -> None:
    generator = dino_views(32, num_local_crops=2)
    assert list(generator.view_configs) == ["global_0", "global_1", "local_0", "local_1"]
    first, second = generator.view_configs["global_0"], generator.view_configs["global_1"]
    assert first.solarize_prob == 0.0 and second.solarize_prob == 0.2
    assert generator.view_configs["local_0"].output_size == 16
    assert generator.view_configs["local_0"].crop_scale == (0.05, 0.4)
    big = dino_views(224, num_local_crops=8)
    assert big.view_configs["global_0"].blur_prob == 1.0 and big.view_configs["global_1"].blur_prob == 0.1
    assert big.view_configs["local_0"].output_size == 96 and big.view_configs["global_0"].kernel_size == 23
    assert local_crop_size(96) == 48


def test_simclr_cifar_recipe_follows_the_paper() -> None:
    cfg = simclr_views(32).view_configs["view1"]
    assert cfg.crop_scale == (0.08, 1.0) and cfg.blur_prob == 0.0 and cfg.grayscale_prob == 0.2
    jitter = (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.jitter_prob)
    assert jitter == pytest.approx((0.4, 0.4, 0.4, 0.1, 0.8))


def test_views_are_float32_and_unchanged_under_autocast() -> None:
    images, generator = uint8_images(batch=4, size=32), simclr_views(32)
    expected = generator(images, seeded())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = generator(images, seeded())
    for name, view in under_autocast.items():
        assert view.dtype == torch.float32 and torch.equal(view, expected[name])


def test_a_generator_has_one_normalisation_for_all_its_views() -> None:
    assert simclr_views(16).normalization.mean == IMAGENET_MEAN
    with pytest.raises(ValueError, match="share one mean/std"):
        ViewGenerator.two_view(ViewConfig(16), ViewConfig(16, mean=(0.5, 0.5, 0.5)))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hflip_prob": 1.5}, "hflip_prob"),
        ({"jitter_prob": -0.1}, "jitter_prob"),
        ({"crop_scale": (0.9, 0.1)}, "crop_scale"),
        ({"crop_ratio": (2.0, 0.5)}, "crop_ratio"),
        ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
        ({"blur_kernel_size": 4}, "blur_kernel_size"),
        ({"output_size": 0}, "output_size"),
    ],
)
def test_view_config_rejects_bad_fields(overrides: dict[str, object], field: str) -> None:
    settings: dict[str, object] = {"output_size": 16, **overrides}
    with pytest.raises(ValueError, match=field):
        ViewConfig(**settings)


@pytest.mark.parametrize(
    "bad", [torch.zeros(2, 2, 8, 8), torch.zeros(3, 8, 8), torch.zeros(1, 3, 8, 8, dtype=torch.int32)]
)
def test_bad_images_are_rejected(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        augment_view(bad, ViewConfig(8), seeded())
