"""The image data contract: Parquet schema, PNG encoding, batched decoding, and what a source yields.

One Parquet row per image (see DESIGN.md, "Data contract")::

    id: string, image: binary (PNG/JPEG bytes), label: int32 (null = unlabeled), split: string

A source (``ssl_core.sources``) lists ``SourceRecord`` objects (id, label, origin split) without reading
pixels and loads ``Sample`` objects (the record plus the image, shape (H, W, C) uint8). An image file that
PIL cannot verify and fully load raises ``CorruptImageError`` (holding a ``CorruptImage``).

This module uses numpy, PIL, pyarrow and torch only; it never imports Ray or MLflow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

SCHEMA_VERSION = 1
"""Version of the Parquet layout and ``_manifest.json`` written by ingest; bump on incompatible change."""

PARQUET_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
        pa.field("split", pa.string(), nullable=False),
    ]
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
"""File name endings (case-insensitive) that the image-folder source reads; other files are ignored."""

@dataclass(frozen=True)
class SourceRecord:
    """What a source knows about one image without reading its pixels."""

    id: str
    label: int | None
    origin_split: str | None


@dataclass(frozen=True)
class Sample:
    """One image from a source.

    ``image`` has shape (H, W, C), dtype uint8, C in {1, 3}. ``encoded`` holds the original file bytes when
    they already are PNG or JPEG in mode L or RGB (so ingest stores them as they are instead of
    re-encoding a JPEG photo as a much larger PNG); otherwise None.
    """

    id: str
    image: np.ndarray
    label: int | None
    origin_split: str | None
    encoded: bytes | None = None


@dataclass(frozen=True)
class CorruptImage:
    """A file that could not be read: its path and the decoder's reason."""

    path: str
    reason: str


class CorruptImageError(Exception):
    """Raised by ``read_image_file`` (and so by a source's ``load``) for an image file that cannot be decoded."""

    def __init__(self, corrupt: CorruptImage) -> None:
        super().__init__(f"{corrupt.path}: {corrupt.reason}")
        self.corrupt = corrupt


# --------------------------------------------------------------------------------------------------
# Encoding and decoding
# --------------------------------------------------------------------------------------------------


def encode_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    """Encode a uint8 image as PNG bytes (lossless, deterministic).

    Shape: (H, W) or (H, W, 1) -> grayscale PNG; (H, W, 3) -> RGB; (H, W, 4) -> RGBA.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png expects a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        mode = "L"
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        mode = "RGB" if image.shape[2] == 3 else "RGBA"
    else:
        raise ValueError(f"encode_png expects shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode=mode).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so the shorter side is ``size``, then center-crop to ``size`` x ``size``.

    A square image is simply resized; a non-square one keeps its aspect ratio (as torchvision's
    Resize + CenterCrop evaluation transform does) instead of being squashed.
    """
    width, height = image.size
    if width == height:
        return image if width == size else image.resize((size, size), Image.Resampling.BILINEAR)
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


EXIF_ORIENTATION = 0x0112
ALPHA_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited over white: what a viewer shows on a white page."""
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def scale_16_bit(values: np.ndarray) -> np.ndarray:
    """16-bit intensities (0..65535) as 8-bit ones: ``round(v * 255 / 65535)``, the full range kept (clipping at
    255 would turn nearly every pixel white). Shape unchanged; dtype uint8."""
    return np.clip(np.round(values.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)


def as_seen(image: Image.Image) -> Image.Image:
    """The image a person sees, in mode ``L`` (grayscale sources) or ``RGB`` (everything else), 8 bits per channel.

    - EXIF orientation (JPEG/WebP/PNG from cameras, phones): applied, so a photo taken upright comes out upright.
    - Alpha (RGBA, LA, PA, palette with a transparent index): composited over ``ALPHA_BACKGROUND`` (white),
      as a viewer shows it on a white page, instead of dropping alpha (which turns the hidden colour of a
      transparent pixel, often black, into content).
    - 16-bit (and 32-bit integer) grayscale: scaled ``round(v * 255 / 65535)``, not clipped at 255 (PIL's own
      conversion turns every value above 255 white). 16-bit RGB PNGs are already reduced to 8 bits by PIL.
    - Palette, CMYK, YCbCr, 1-bit: converted to RGB (1-bit to L).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_BIT_MODES:
        return Image.fromarray(scale_16_bit(np.asarray(image)), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("1", "L"):
        return image.convert("L")
    return image.convert("RGB")


def decode_rgb(data: bytes, image_size: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to an RGB uint8 array, optionally resized (see ``decode_images``).

    The pixels are ``as_seen``'s (EXIF orientation applied, alpha over white, 16-bit scaled).
    Shape: (H, W, 3), or (image_size, image_size, 3). Raises whatever PIL raises on damaged bytes.
    """
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        image = as_seen(opened).convert("RGB")
    if image_size is not None:
        image = _resize_center_crop(image, image_size)
    return np.asarray(image, dtype=np.uint8)


def decode_images(encoded: Sequence[bytes], image_size: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Decode a batch of encoded images into one uint8 tensor; never raises on a damaged image.

    Every image goes through ``as_seen`` (EXIF orientation, alpha over white, 16-bit scaling) and becomes RGB
    (grayscale repeated over three channels). With ``image_size``, each image is
    bilinearly resized so its shorter side is ``image_size`` and center-cropped to a square (a square image
    is just resized). Without it, all decodable images must share one size (else ``ValueError``).

    Returns ``(images, failed)``: images of the decodable inputs in input order,
    Shape: (len(encoded) - len(failed), 3, S, S) uint8; ``failed`` lists the input indices that could not be
    decoded (corrupt, truncated, unknown format).
    """
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    arrays: list[np.ndarray] = []
    failed: list[int] = []
    for index, data in enumerate(encoded):
        try:
            arrays.append(decode_rgb(data, image_size))
        except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            failed.append(index)
    if not arrays:
        side = image_size or 0
        return torch.empty((0, 3, side, side), dtype=torch.uint8), failed
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; pass image_size to resize them")
    batch = torch.from_numpy(np.stack(arrays))  # (B, H, W, 3)
    return batch.permute(0, 3, 1, 2).contiguous(), failed


def _as_hwc_uint8(image: Image.Image) -> np.ndarray:
    """PIL image -> ``as_seen`` pixels: (H, W, 1) for grayscale sources, (H, W, 3) for everything else."""
    seen = as_seen(image)
    array = np.asarray(seen, dtype=np.uint8)
    return array[:, :, None] if seen.mode == "L" else array


def read_image_file(path: Path) -> tuple[np.ndarray, bytes | None]:
    """Verify and fully decode one image file.

    Returns ``(image (H, W, C) uint8 as ``as_seen`` gives it, original bytes if 8-bit PNG/JPEG in mode L/RGB with
    no EXIF rotation else None)``: a rotated, transparent, palette or 16-bit file is stored as a PNG of what it shows.
    Raises ``CorruptImageError`` when PIL cannot identify, verify (chunk CRCs) or fully load the file;
    a truncated file fails because ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default False.
    """
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image_format, mode = opened.format, opened.mode
            upright = opened.getexif().get(EXIF_ORIENTATION, 1) == 1
            array = _as_hwc_uint8(opened)
    except Exception as error:  # noqa: BLE001 - any decoder failure makes this one file corrupt
        message = "cannot identify image file" if isinstance(error, UnidentifiedImageError) else str(error)
        reason = f"{type(error).__name__}: {message}".strip().rstrip(":")
        raise CorruptImageError(CorruptImage(str(path), reason)) from error
    keep_bytes = image_format in ("PNG", "JPEG") and mode in ("L", "RGB") and upright and not _png_16_bit(data)
    return array, (data if keep_bytes else None)


def _png_16_bit(data: bytes) -> bool:
    """Whether ``data`` is a PNG of 16 bits per sample (its IHDR's bit depth, byte 24): PIL opens a 16-bit RGB PNG
    as mode RGB (high bytes), so only the header tells; such a file is stored as the 8-bit PNG of what it shows."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 and data[24] == 16
