"""Image formats end up as the RGB image a person sees: RGBA and transparent palettes composited over white,
palette colours looked up, 16-bit grayscale scaled (not clipped), grayscale repeated, EXIF rotation applied.

Each case writes a real file with PIL, then checks three readers against an expected array computed here by
hand: ``read_image_file`` (what ingest loads), ``decode_rgb`` (what the readers decode), and a real ingest of a
folder of these files read back from its Parquet shards."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines.datasets import read_manifest
from pipelines.stages.ingest import ingest
from ssl_core.data import ALPHA_BACKGROUND, decode_rgb, read_image_file

WHITE = np.array(ALPHA_BACKGROUND, dtype=np.float64)


def over_white(rgba: np.ndarray) -> np.ndarray:
    """Naive "over" compositing, pixel by pixel: out = alpha * colour + (1 - alpha) * white."""
    out = np.zeros(rgba.shape[:2] + (3,), dtype=np.uint8)
    for row in range(rgba.shape[0]):
        for column in range(rgba.shape[1]):
            alpha = rgba[row, column, 3] / 255.0
            out[row, column] = np.round(alpha * rgba[row, column, :3] + (1 - alpha) * WHITE)
    return out


def write_rgba(path: Path) -> np.ndarray:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (200, 10, 10, 255)  # opaque red
    rgba[:, 4:] = (0, 0, 255, 0)  # fully transparent, blue underneath: must not show
    rgba[0, :] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba, mode="RGBA").save(path)
    return over_white(rgba)


def write_palette(path: Path) -> np.ndarray:
    palette = [(250, 0, 0), (0, 240, 0), (0, 0, 230), (90, 90, 90)]
    indices = (np.arange(64).reshape(8, 8) % 4).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([channel for colour in palette for channel in colour])
    image.save(path)
    return np.array([[palette[index] for index in row] for row in indices], dtype=np.uint8)


def write_palette_transparent(path: Path) -> np.ndarray:
    palette = [(250, 0, 0), (0, 240, 0)]
    indices = (np.arange(64).reshape(8, 8) % 2).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([channel for colour in palette for channel in colour])
    image.save(path, transparency=1)  # index 1 (green) is transparent
    return np.array([[palette[0] if index == 0 else ALPHA_BACKGROUND for index in row] for row in indices],
                    dtype=np.uint8)


def write_gray16(path: Path) -> np.ndarray:
    values = (np.arange(64).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520: most above 255
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    scaled = np.array([[round(int(v) * 255 / 65535) for v in row] for row in values], dtype=np.uint8)
    return np.repeat(scaled[:, :, None], 3, axis=2)


def png_16_bit_rgb(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (colour type 2, bit depth 16; PIL cannot write one), chunk by chunk."""
    height, width, _ = values.shape
    scanlines = b"".join(b"\x00" + values[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines))
            + chunk(b"IEND", b""))


def write_rgb16(path: Path) -> np.ndarray:
    ramp = np.arange(64).reshape(8, 8) * 1040  # 0 .. 65520
    values = np.stack([ramp, ramp[::-1], 65535 - ramp], axis=2).astype(np.uint16)
    path.write_bytes(png_16_bit_rgb(values))
    return np.array([[[round(int(v) * 255 / 65535) for v in pixel] for pixel in row] for row in values],
                    dtype=np.uint8)


def write_gray(path: Path) -> np.ndarray:
    values = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(values, mode="L").save(path)
    return np.repeat(values[:, :, None], 3, axis=2)


def write_exif_rotated(path: Path) -> np.ndarray:
    """A 32 wide x 16 high JPEG whose EXIF says "rotate 90 degrees clockwise to display" (orientation 6)."""
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, :16] = (255, 255, 255)  # left half white, right half black; 8x8-aligned blocks keep JPEG exact-ish
    stored[:8, 16:] = (255, 0, 0)  # top of the right half red
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    seen = np.zeros((32, 16, 3), dtype=np.uint8)  # turned clockwise: 16 wide x 32 high
    for row in range(16):
        for column in range(32):
            seen[column, 15 - row] = stored[row, column]
    return seen


CASES = {
    "rgba.png": (write_rgba, 0),
    "palette.png": (write_palette, 0),
    "palette_transparent.png": (write_palette_transparent, 0),
    "gray16.png": (write_gray16, 0),
    "rgb16.png": (write_rgb16, 0),  # PIL keeps each channel's high byte: within 1 of the scaled value
    "gray.png": (write_gray, 0),
    "exif_rotated.jpg": (write_exif_rotated, 12),  # JPEG: a few levels of error at the colour edges
}


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: int) -> None:
    assert actual.shape == expected.shape
    error = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
    if tolerance == 0:
        assert error.max() <= 1, error.max()  # compositing rounds once
    else:
        assert error.mean() <= tolerance, error.mean()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_format_reads_as_seen(tmp_path: Path, name: str):
    write, tolerance = CASES[name]
    path = tmp_path / name
    expected = write(path)
    loaded, kept = read_image_file(path)
    if name in ("gray.png", "gray16.png"):
        assert loaded.shape[2] == 1  # a grayscale source stays one channel in ingest
        loaded = np.repeat(loaded, 3, axis=2)
    assert_close(loaded, expected, tolerance)
    assert_close(decode_rgb(path.read_bytes()), expected, tolerance)
    # Only bytes that already show what they hold are kept; the rest are stored as a PNG of what is seen.
    assert (kept is not None) == (name == "gray.png")


def test_ingested_folder_stores_what_is_seen(tmp_path: Path):
    folder = tmp_path / "images"
    folder.mkdir()
    expected = {name: (write(folder / name), tolerance) for name, (write, tolerance) in CASES.items()}
    manifest = ingest(str(folder), tmp_path / "out", val_fraction=0.0, test_fraction=0.0, workers=2)
    assert manifest["num_rows"] == len(CASES) and manifest["corrupt_count"] == 0
    shards = read_manifest(tmp_path / "out")["shards"]
    table = pq.read_table([str(tmp_path / "out" / shard["file"]) for shard in shards])
    rows = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True))
    for name, (image, tolerance) in expected.items():
        assert_close(decode_rgb(rows[name]), image, tolerance)


def test_a_16_bit_npz_is_scaled_to_8_bits_not_clipped(tmp_path: Path):
    """uint16 arrays (16-bit scans) ingest as v * 255 / 65535 (bit depth), read back from the Parquet shards."""
    ramp = (np.arange(4 * 64).reshape(4, 8, 8) * 257).astype(np.uint16)  # 0 .. 65535 over the 4 images
    np.savez(tmp_path / "scans.npz", x=ramp)
    manifest = ingest(str(tmp_path / "scans.npz"), tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    table = pq.read_table([str(tmp_path / "out" / shard["file"]) for shard in manifest["shards"]])
    rows = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True))
    for index in range(4):
        expected = np.array([[round(int(v) * 255 / 65535) for v in row] for row in ramp[index]], dtype=np.uint8)
        assert_close(decode_rgb(rows[f"scans/{index}"]), np.repeat(expected[:, :, None], 3, axis=2), 0)
    assert decode_rgb(rows["scans/0"]).min() == 0 and decode_rgb(rows["scans/3"]).max() == 255


def test_224_px_path_ingest_bounds_big_originals_and_augments_at_224(tmp_path: Path):
    """Photos above 224 px: originals up to ``max_image_side`` are stored as they are, a bigger one downscaled to
    it (aspect kept); the reader decodes them to 224 px and SimCLR's random-resized-crop views run at 224 on CPU."""
    from pipelines.datasets import load_split_tensors
    from ssl_core.views import simclr_views

    folder = tmp_path / "photos"
    folder.mkdir()
    rows, columns = np.mgrid[0:260, 0:300]
    for index in range(3):
        photo = np.stack([(rows + 40 * index) % 256, columns % 256, (rows + columns) % 256], axis=2).astype(np.uint8)
        Image.fromarray(photo).save(folder / f"photo{index}.jpg", quality=90)
    Image.fromarray(np.full((600, 800, 3), 128, dtype=np.uint8)).save(folder / "big.png")
    manifest = ingest(str(folder), tmp_path / "out", val_fraction=0.0, test_fraction=0.0, max_image_side=400)
    assert manifest["max_image_side"] == 400
    assert sorted(map(tuple, manifest["image_sizes"])) == [(260, 300, 3), (300, 400, 1)]  # (H, W, count)
    table = pq.read_table([str(tmp_path / "out" / shard["file"]) for shard in manifest["shards"]])
    stored = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True))
    assert stored["photo1.jpg"] == (folder / "photo1.jpg").read_bytes()  # kept as it was
    assert decode_rgb(stored["big.png"]).shape == (300, 400, 3)
    images, _ = load_split_tensors(tmp_path / "out", "train", 224, labeled_only=False)
    assert images.shape == (4, 3, 224, 224) and images.dtype == torch.uint8
    views = simclr_views(224)(images, torch.Generator().manual_seed(0))
    assert {name: tuple(view.shape) for name, view in views.items()} == {"view1": (4, 3, 224, 224),
                                                                          "view2": (4, 3, 224, 224)}
    assert all(torch.isfinite(view).all() for view in views.values())
    assert not torch.equal(views["view1"], views["view2"])
