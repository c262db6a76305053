"""Batched, on-device view generation for self-supervised learning.

Every op works on a whole batch ``(B, C, H, W)`` at once, on the device of the input, with per-sample random
parameters and no Python loop over samples. This replaces per-image PIL pipelines (SimCLR's
``RandomResizedCrop -> RandomHorizontalFlip -> ColorJitter -> RandomGrayscale -> GaussianBlur -> Solarize ->
Normalize``) and applies the same steps in the same order:

1. ``to_float_image``: uint8 ``[0, 255]`` or float ``[0, 1]`` to float32 ``[0, 1]``; one channel repeated to three.
2. Random resized crop and horizontal flip in one resampling: a per-sample affine ``theta`` drives
   ``F.affine_grid`` + ``F.grid_sample`` (bilinear, ``align_corners=False``, border padding) to ``output_size``.
   Scale is uniform in ``crop_scale``, aspect ratio log-uniform in ``crop_ratio`` (as torchvision's
   ``RandomResizedCrop``); a box that does not fit is clamped into the image instead of re-drawn.
3. Colour jitter with probability ``jitter_prob``, in the fixed order brightness, contrast, saturation, hue, each
   followed by a clamp to ``[0, 1]`` (torchvision's ``adjust_*`` formulas; torchvision permutes the order randomly).
4. Grayscale with probability ``grayscale_prob`` (ITU-R 601 luma, ``0.299 R + 0.587 G + 0.114 B``).
5. Gaussian blur with probability ``blur_prob``, per-sample sigma uniform in ``blur_sigma``, odd kernel of about
   10% of ``output_size``, reflect padding, separable grouped convolution.
6. Solarisation with probability ``solarize_prob``: ``x -> 1 - x`` where ``x >= 0.5``.
7. ``normalize``: ``(x - mean) / std`` per channel.

Randomness: all of a view's parameters are drawn in one ``torch.rand(B, 14, generator=generator)`` call on the
generator's device and then moved to the images' device (through pinned memory, without waiting for the device:
``host_to_device``). A CPU generator (recommended) therefore gives the same views for the same seed on CPU and on
CUDA; a CUDA generator draws on the GPU. ``generator=None`` uses torch's global generator of the images' device.
The same seed and inputs always give identical views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_core.hparams import bounded, validate_config

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)  # ITU-R BT.601
SOLARIZE_THRESHOLD = 0.5

# Columns of the per-sample uniform draws of one view, in a fixed order so a seed always maps to the same views.
_CROP_SCALE, _CROP_RATIO, _CROP_X, _CROP_Y, _FLIP = 0, 1, 2, 3, 4
_JITTER, _BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 5, 6, 7, 8, 9
_GRAYSCALE, _BLUR, _BLUR_SIGMA, _SOLARIZE = 10, 11, 12, 13
_NUM_DRAWS = 14


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian kernel size of about 10% of the image side (SimCLR), at least 3: 32 -> 3, 96 -> 9, 224 -> 23."""
    size = int(0.1 * image_size)
    size += 1 - size % 2
    return max(size, 3)


@dataclass(frozen=True)
class ViewConfig:
    """The augmentation recipe of one view; defaults are BYOL's colour settings with SimCLR's crop.

    ``blur_kernel_size=None`` means ``blur_kernel_size(output_size)``. Strengths follow torchvision's
    ``ColorJitter``: brightness, contrast and saturation factors are uniform in ``[max(0, 1 - s), 1 + s]``,
    the hue shift is uniform in ``[-hue, hue]`` (fraction of a full turn).
    """

    output_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = bounded(0.5, 0.0, 1.0)
    jitter_prob: float = bounded(0.8, 0.0, 1.0)
    brightness: float = bounded(0.4, 0.0)
    contrast: float = bounded(0.4, 0.0)
    saturation: float = bounded(0.2, 0.0)
    hue: float = bounded(0.1, 0.0, 0.5)
    grayscale_prob: float = bounded(0.2, 0.0, 1.0)
    blur_prob: float = bounded(0.0, 0.0, 1.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = bounded(0.0, 0.0, 1.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    blur_kernel_size: int | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.output_size, bool) or not isinstance(self.output_size, int) or self.output_size < 1:
            raise ValueError(f"{name}.output_size={self.output_size!r} must be a positive int")
        for field_name, length in (("crop_scale", 2), ("crop_ratio", 2), ("blur_sigma", 2), ("mean", 3), ("std", 3)):
            value = getattr(self, field_name)
            if not isinstance(value, Sequence) or len(value) != length:
                raise ValueError(f"{name}.{field_name}={value!r} must be a sequence of {length} numbers")
            object.__setattr__(self, field_name, tuple(float(v) for v in value))
        validate_config(self)
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"{name}.crop_scale={self.crop_scale!r} must satisfy 0 < low <= high <= 1")
        low, high = self.crop_ratio
        if not 0.0 < low <= high:
            raise ValueError(f"{name}.crop_ratio={self.crop_ratio!r} must satisfy 0 < low <= high")
        low, high = self.blur_sigma
        if not 0.0 < low <= high:
            raise ValueError(f"{name}.blur_sigma={self.blur_sigma!r} must satisfy 0 < low <= high")
        if any(s <= 0.0 for s in self.std):
            raise ValueError(f"{name}.std={self.std!r} must be positive")
        kernel = self.blur_kernel_size
        bad_kernel = isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0
        if kernel is not None and bad_kernel:
            raise ValueError(f"{name}.blur_kernel_size={kernel!r} must be a positive odd int or None")
        if self.blur_prob > 0 and self.kernel_size // 2 >= self.output_size:
            raise ValueError(
                f"{name}.blur_kernel_size={self.kernel_size} is too large for output_size={self.output_size}"
            )

    @property
    def kernel_size(self) -> int:
        """The Gaussian blur kernel size actually used."""
        return self.blur_kernel_size if self.blur_kernel_size is not None else blur_kernel_size(self.output_size)


def host_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor.to(device)`` without a host-device synchronisation.

    A blocking copy from pageable host memory to CUDA (what ``tensor.to("cuda")`` and ``torch.tensor(..., device=
    "cuda")`` do) waits until the device has finished all its queued work, so the host can no longer run ahead of the
    GPU; a non-blocking copy from pinned memory does not. Used for the small per-step tensors of the augmentations
    (random draws, normalisation constants).
    """
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_float_image(images: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` or float ``[0, 1]`` images to float32 ``[0, 1]`` with three channels.

    uint8 is divided by 255; float input is cast to float32 and not range-checked (that would sync the device).
    Shape: (B, 1 or 3, H, W) -> (B, 3, H, W).
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")
    if images.dtype == torch.uint8:
        images = images.to(torch.float32).div_(255.0)
    elif images.is_floating_point():
        images = images.to(torch.float32)
    else:
        raise ValueError(f"expected uint8 or floating-point images, got {images.dtype}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel ``(x - mean) / std``. Shape: (B, C, H, W) with ``len(mean) == len(std) == C``."""
    mean_t = host_to_device(torch.tensor(mean, dtype=images.dtype), images.device).view(1, -1, 1, 1)
    std_t = host_to_device(torch.tensor(std, dtype=images.dtype), images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` of float images in [0, 1]: the last step of every view, and what evaluation
    applies to un-augmented images so that they match what the encoder was trained on."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, images: Tensor) -> Tensor:
        return normalize(images, self.mean, self.std)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``. Shape: (B, 3, H, W) -> (B, 1, H, W)."""
    red, green, blue = images.unbind(1)
    return (LUMA_WEIGHTS[0] * red + LUMA_WEIGHTS[1] * green + LUMA_WEIGHTS[2] * blue).unsqueeze(1)


def resized_crop(images: Tensor, boxes: Tensor, flip: Tensor, output_size: int | tuple[int, int]) -> Tensor:
    """Crop a per-sample box, optionally mirror it horizontally, and resize it bilinearly, in one resampling.

    ``boxes`` holds ``(x0, y0, width, height)`` in pixels (pixel edges: the full image is ``(0, 0, W, H)``; they
    may be fractional). Output pixel centres are mapped into the box, so an integer box resized to its own size
    returns exactly that slice. Samples outside the image repeat the border (as a clamped ``F.interpolate``);
    downscaling is not antialiased.
    Shape: images (B, C, H, W), boxes (B, 4), flip (B,) bool -> (B, C, out_h, out_w).
    """
    batch, channels, height, width = images.shape
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    boxes = boxes.to(images.dtype)
    x0, y0, box_w, box_h = boxes.unbind(1)
    sign = 1.0 - 2.0 * flip.to(images.dtype)
    zero = torch.zeros_like(x0)
    theta = torch.stack(
        [
            box_w / width * sign, zero, (2.0 * x0 + box_w) / width - 1.0,
            zero, box_h / height, (2.0 * y0 + box_h) / height - 1.0,
        ],
        dim=1,
    ).view(batch, 2, 3)
    grid = F.affine_grid(theta, [batch, channels, out_h, out_w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _hue_shift(images: Tensor, hue_factor: Tensor) -> Tensor:
    """Rotate the HSV hue by ``hue_factor`` turns, keeping saturation and value (exact HSV round trip).

    With ``M = max``, ``m = min`` and chroma ``c = M - m`` per pixel, the hue in sextants is
    ``h = ((G - B) / c) mod 6`` if ``M = R``, ``(B - R) / c + 2`` if ``M = G``, else ``(R - G) / c + 4``; the
    shifted image is ``out_n = M - c * clamp(min(k_n, 4 - k_n), 0, 1)`` with ``k_n = (n + h + 6 * hue) mod 6``
    and ``n = 5, 3, 1`` for R, G, B.
    """
    red, green, blue = images.unbind(1)
    max_c = images.amax(1)
    chroma = max_c - images.amin(1)
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        max_c == red,
        torch.remainder((green - blue) / safe_chroma, 6.0),
        torch.where(max_c == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0),
    )
    hue = hue + 6.0 * hue_factor.view(-1, 1, 1)
    offsets = host_to_device(torch.tensor([5.0, 3.0, 1.0], dtype=images.dtype), images.device).view(1, 3, 1, 1)
    k = torch.remainder(offsets + hue.unsqueeze(1), 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return max_c.unsqueeze(1) - chroma.unsqueeze(1) * weight


def color_jitter(
    images: Tensor,
    brightness_factor: Tensor | None = None,
    contrast_factor: Tensor | None = None,
    saturation_factor: Tensor | None = None,
    hue_factor: Tensor | None = None,
) -> Tensor:
    """Per-sample colour jitter in the fixed order brightness, contrast, saturation, hue; ``None`` skips a step.

    With ``blend(a, b, f) = clamp(f * a + (1 - f) * b, 0, 1)`` (torchvision's ``adjust_*``):
    brightness ``blend(x, 0, f)``, contrast ``blend(x, mean(gray(x)), f)`` (mean over the image),
    saturation ``blend(x, gray(x), f)``, hue: rotate the HSV hue by ``f`` turns (``f`` in ``[-0.5, 0.5]``).
    Shape: images (B, 3, H, W) in [0, 1], factors (B,) -> (B, 3, H, W).
    """
    if brightness_factor is not None:
        images = (brightness_factor.view(-1, 1, 1, 1) * images).clamp(0.0, 1.0)
    if contrast_factor is not None:
        factor = contrast_factor.view(-1, 1, 1, 1)
        mean = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
        images = (factor * images + (1.0 - factor) * mean).clamp(0.0, 1.0)
    if saturation_factor is not None:
        factor = saturation_factor.view(-1, 1, 1, 1)
        images = (factor * images + (1.0 - factor) * rgb_to_grayscale(images)).clamp(0.0, 1.0)
    if hue_factor is not None:
        images = _hue_shift(images, hue_factor)
    return images


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-sample Gaussian blur: separable, reflect padding, grouped convolution (one group per channel).

    Kernel ``g_i = exp(-x_i^2 / (2 sigma^2)) / sum_j exp(-x_j^2 / (2 sigma^2))`` at ``x_i = i - (k - 1) / 2``
    (torchvision's ``gaussian_blur``). Shape: images (B, C, H, W), sigma (B,) -> (B, C, H, W).
    """
    batch, channels, height, width = images.shape
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size} must be a positive odd int")
    half = (kernel_size - 1) / 2
    positions = torch.linspace(-half, half, kernel_size, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (positions / sigma.to(images.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B * C, k)
    groups = batch * channels
    pad = kernel_size // 2
    flat = images.reshape(1, groups, height, width)
    row_kernel, column_kernel = kernel.view(groups, 1, 1, kernel_size), kernel.view(groups, 1, kernel_size, 1)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), row_kernel, groups=groups)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), column_kernel, groups=groups)
    return flat.view(batch, channels, height, width)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) draws on the generator's device (the images' device when None), moved to ``device``."""
    draw_device = generator.device if generator is not None else device
    return host_to_device(torch.rand(shape, generator=generator, device=draw_device), torch.device(device))


def _between(unit: Tensor, low: float, high: float) -> Tensor:
    return low + unit * (high - low)


def _crop_boxes(draws: Tensor, height: int, width: int, cfg: ViewConfig) -> Tensor:
    """``(x0, y0, w, h)`` per sample: area ``scale * H * W``, log-uniform ratio, clamped into the image."""
    area = _between(draws[:, _CROP_SCALE], *cfg.crop_scale) * (height * width)
    log_low, log_high = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    ratio = torch.exp(_between(draws[:, _CROP_RATIO], log_low, log_high))
    box_w = torch.sqrt(area * ratio).clamp(min=min(1.0, width), max=width)
    box_h = torch.sqrt(area / ratio).clamp(min=min(1.0, height), max=height)
    x0 = draws[:, _CROP_X] * (width - box_w)
    y0 = draws[:, _CROP_Y] * (height - box_h)
    return torch.stack([x0, y0, box_w, box_h], dim=1)


def augment_float(images: Tensor, cfg: ViewConfig, generator: torch.Generator | None) -> Tensor:
    """``augment_view`` of images already converted by ``to_float_image`` (so several views convert once).
    Computed in float32 even when called under autocast (a training step's objective is)."""
    with torch.autocast(images.device.type, enabled=False):
        return _augment(images, cfg, generator)


def _augment(images: Tensor, cfg: ViewConfig, generator: torch.Generator | None) -> Tensor:
    batch, _, height, width = images.shape
    draws = _uniform((batch, _NUM_DRAWS), generator, images.device)

    def chosen(column: int, probability: float) -> Tensor:
        return (draws[:, column] < probability).view(-1, 1, 1, 1)

    boxes, flip = _crop_boxes(draws, height, width, cfg), draws[:, _FLIP] < cfg.hflip_prob
    out = resized_crop(images, boxes, flip, cfg.output_size)
    if cfg.jitter_prob > 0:
        def factor(column: int, strength: float) -> Tensor | None:
            return _between(draws[:, column], max(0.0, 1.0 - strength), 1.0 + strength) if strength > 0 else None

        jittered = color_jitter(
            out,
            factor(_BRIGHTNESS, cfg.brightness),
            factor(_CONTRAST, cfg.contrast),
            factor(_SATURATION, cfg.saturation),
            _between(draws[:, _HUE], -cfg.hue, cfg.hue) if cfg.hue > 0 else None,
        )
        out = torch.where(chosen(_JITTER, cfg.jitter_prob), jittered, out)
    if cfg.grayscale_prob > 0:
        out = torch.where(chosen(_GRAYSCALE, cfg.grayscale_prob), rgb_to_grayscale(out).expand_as(out), out)
    if cfg.blur_prob > 0:
        blurred = gaussian_blur(out, _between(draws[:, _BLUR_SIGMA], *cfg.blur_sigma), cfg.kernel_size)
        out = torch.where(chosen(_BLUR, cfg.blur_prob), blurred, out)
    if cfg.solarize_prob > 0:
        out = torch.where(chosen(_SOLARIZE, cfg.solarize_prob) & (out >= SOLARIZE_THRESHOLD), 1.0 - out, out)
    return normalize(out, cfg.mean, cfg.std)


def augment_view(images: Tensor, cfg: ViewConfig, generator: torch.Generator | None = None) -> Tensor:
    """One augmented view of every image, with independent random parameters per sample.

    Shape: (B, 1 or 3, H, W) uint8 [0, 255] or float [0, 1] -> (B, 3, output_size, output_size) float32,
    normalised by ``cfg.mean`` / ``cfg.std``, on the images' device.
    """
    return augment_float(to_float_image(images), cfg, generator)


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample random masking: shuffle patches by ``argsort`` of uniform noise, keep the first ones.

    Keeps ``n_keep = round(num_patches * (1 - mask_ratio))`` patches per sample. ``ids_restore`` is the inverse
    permutation (``argsort`` of the shuffle), so ``gather(shuffled, 1, ids_restore)`` restores patch order.
    Noise is drawn on the generator's device and moved to ``device``.
    Shape: ids_keep (B, n_keep) long, mask (B, N) float with 1 = masked (removed), ids_restore (B, N) long.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must be in [0, 1)")
    num_keep = round(num_patches * (1.0 - mask_ratio))
    if num_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch out of num_patches={num_patches}")
    target = torch.device(device) if device is not None else torch.device("cpu")
    noise = _uniform((batch_size, num_patches), generator, target)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones(batch_size, num_patches, device=target)
    mask[:, :num_keep] = 0.0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


# ---------------------------------------------------------------------------------------- strong augmentation
STRONG_OPS: tuple[str, ...] = (
    "identity", "autocontrast", "brightness", "contrast", "color", "sharpness", "posterize", "solarize",
    "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
)
"""RandAugment's operations (Cubuk et al., 2020) as FixMatch uses them, less ``equalize`` (a per-image histogram)."""
CUTOUT_FILL = 0.5


def _blend(images: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``ImageEnhance``: ``clamp(degenerate + factor * (images - degenerate), 0, 1)``, factor per sample."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (images - degenerate)).clamp(0.0, 1.0)


def _strong_op(name: str, images: Tensor, strength: Tensor, sign: Tensor) -> Tensor:
    """One RandAugment op on every image at per-sample ``strength`` in [0, 1] (``sign`` in {-1, 1} for the signed
    ones). Ranges at strength 1: enhance factors 1 +- 0.9, posterize to 4 bits, solarize threshold 0, rotate
    +-30 degrees, shear +-0.3, translate +-30% of the side."""
    batch = images.shape[0]
    signed = strength * sign
    if name == "identity":
        return images
    if name == "autocontrast":
        low = images.amin(dim=(2, 3), keepdim=True)
        high = images.amax(dim=(2, 3), keepdim=True)
        return torch.where(high > low, (images - low) / (high - low).clamp(min=1e-6), images)
    if name == "brightness":
        return _blend(images, torch.zeros_like(images), 1.0 + 0.9 * signed)
    if name == "contrast":
        mean = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(images, mean.expand_as(images), 1.0 + 0.9 * signed)
    if name == "color":
        return _blend(images, rgb_to_grayscale(images).expand_as(images), 1.0 + 0.9 * signed)
    if name == "sharpness":
        kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=images.dtype) / 13.0
        kernel = host_to_device(kernel, images.device).expand(3, 1, 3, 3)
        smooth = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        return _blend(images, smooth, 1.0 + 0.9 * signed)
    if name == "posterize":  # keep 8 - round(4 strength) bits of the 8-bit value
        step = torch.pow(2.0, torch.round(4.0 * strength)).view(-1, 1, 1, 1)
        return torch.floor(torch.round(images * 255.0) / step) * step / 255.0
    if name == "solarize":  # invert the pixels above 1 - strength
        threshold = (1.0 - strength).view(-1, 1, 1, 1)
        return torch.where(images > threshold, 1.0 - images, images)
    zero, one = torch.zeros_like(signed), torch.ones_like(signed)
    if name == "rotate":
        angle = signed * (math.pi / 6.0)
        rows = [torch.cos(angle), -torch.sin(angle), zero, torch.sin(angle), torch.cos(angle), zero]
    elif name == "shear_x":
        rows = [one, 0.3 * signed, zero, zero, one, zero]
    elif name == "shear_y":
        rows = [one, zero, zero, 0.3 * signed, one, zero]
    elif name == "translate_x":
        rows = [one, zero, 0.6 * signed, zero, one, zero]  # 0.6 in [-1, 1] grid units = 30% of the side
    elif name == "translate_y":
        rows = [one, zero, zero, zero, one, 0.6 * signed]
    else:
        raise ValueError(f"unknown strong augmentation op {name!r}; known: {', '.join(STRONG_OPS)}")
    theta = torch.stack(rows, dim=1).view(batch, 2, 3).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images - CUTOUT_FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + CUTOUT_FILL  # outside the image: grey, as PIL's fill=(128, 128, 128)


def cutout(images: Tensor, centres: Tensor, size: float) -> Tensor:
    """Grey square of side ``size`` (fraction of the image side) centred at ``centres`` (B, 2) in [0, 1) (x, y),
    clipped at the borders (DeVries & Taylor, 2017; FixMatch's strong view ends with it)."""
    _, _, height, width = images.shape
    ys = (torch.arange(height, device=images.device, dtype=images.dtype) + 0.5) / height
    xs = (torch.arange(width, device=images.device, dtype=images.dtype) + 0.5) / width
    inside_x = (xs.view(1, -1) - centres[:, :1]).abs() <= size / 2
    inside_y = (ys.view(1, -1) - centres[:, 1:]).abs() <= size / 2
    inside = (inside_y.unsqueeze(2) & inside_x.unsqueeze(1)).unsqueeze(1)
    return torch.where(inside, torch.full_like(images, CUTOUT_FILL), images)


def strong_augment(images: Tensor, num_ops: int, magnitude: float, cutout_size: float,
                   generator: torch.Generator | None = None) -> Tensor:
    """RandAugment-like strong view of float [0, 1] images, batched: per sample, ``num_ops`` ops drawn uniformly
    from ``STRONG_OPS`` (with replacement), each at a strength uniform in ``[0, magnitude]`` with a random sign,
    then ``cutout`` of side ``cutout_size`` (0 = none). All draws come from one ``torch.rand(B, 3 * num_ops + 2)``.
    Every op runs on the whole batch and ``torch.where`` picks per sample (no host sync, no loop over samples).
    Shape: (B, 3, H, W) float in [0, 1] -> same, in [0, 1].
    """
    if num_ops < 0 or not 0.0 <= magnitude <= 1.0 or not 0.0 <= cutout_size <= 1.0:
        raise ValueError(f"num_ops={num_ops} must be >= 0, magnitude={magnitude} and cutout_size={cutout_size} "
                         "in [0, 1]")
    batch = images.shape[0]
    draws = _uniform((batch, 3 * num_ops + 2), generator, images.device)
    with torch.autocast(images.device.type, enabled=False):
        out = images.float()
        for slot in range(num_ops):
            chosen = (draws[:, 3 * slot] * len(STRONG_OPS)).long().clamp(max=len(STRONG_OPS) - 1)
            strength = draws[:, 3 * slot + 1] * magnitude
            sign = torch.where(draws[:, 3 * slot + 2] < 0.5, -1.0, 1.0)
            for index, name in enumerate(STRONG_OPS):
                if name == "identity":
                    continue
                out = torch.where((chosen == index).view(-1, 1, 1, 1), _strong_op(name, out, strength, sign), out)
        if cutout_size > 0:
            out = cutout(out, draws[:, -2:], cutout_size)
    return out
