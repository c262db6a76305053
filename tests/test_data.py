"""ssl_core.data: the Parquet schema, PNG encoding and batched decoding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_core.data import PARQUET_SCHEMA, CorruptImageError, decode_images, encode_png, read_image_file


def random_images(count: int, height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, height, width, channels), dtype=np.uint8)


def test_schema_matches_contract():
    assert PARQUET_SCHEMA.names == ["id", "image", "label", "split"]
    assert str(PARQUET_SCHEMA.field("label").type) == "int32" and PARQUET_SCHEMA.field("label").nullable


def test_png_round_trip_rgb_and_gray():
    rgb = random_images(1, 7, 5, 3)[0]
    gray = random_images(1, 7, 5, 1)[0]
    images, failed = decode_images([encode_png(rgb), encode_png(gray[:, :, 0]), encode_png(gray)])
    assert failed == [] and images.shape == (3, 3, 7, 5) and images.dtype == torch.uint8
    assert torch.equal(images[0], torch.from_numpy(rgb).permute(2, 0, 1))
    for index in (1, 2):  # grayscale becomes RGB with three equal channels
        assert torch.equal(images[index], torch.from_numpy(gray[:, :, 0]).expand(3, 7, 5))


def test_encode_png_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((4, 4, 2), dtype=np.uint8))


def test_decode_images_reports_corrupt_and_resizes():
    good = encode_png(random_images(1, 8, 8, 3)[0])
    wide = encode_png(random_images(1, 8, 16, 3)[0])
    jpeg = io.BytesIO()
    Image.fromarray(random_images(1, 40, 40, 3)[0]).save(jpeg, format="JPEG")
    truncated = jpeg.getvalue()[:300]
    images, failed = decode_images([good, b"garbage", wide, truncated, good], image_size=4)
    assert failed == [1, 3]
    assert images.shape == (3, 3, 4, 4) and images.dtype == torch.uint8
    # The square image is a plain bilinear resize with PIL.
    expected = Image.open(io.BytesIO(good)).convert("RGB").resize((4, 4), Image.Resampling.BILINEAR)
    assert torch.equal(images[0], torch.from_numpy(np.array(expected)).permute(2, 0, 1))


def test_decode_images_all_failed_and_mixed_sizes():
    images, failed = decode_images([b"x", b""], image_size=6)
    assert images.shape == (0, 3, 6, 6) and failed == [0, 1]
    with pytest.raises(ValueError, match="image_size"):
        decode_images([encode_png(random_images(1, 4, 4, 3)[0]), encode_png(random_images(1, 5, 5, 3)[0])])


def test_read_image_file_keeps_png_bytes_and_names_a_corrupt_file(tmp_path: Path):
    image = random_images(1, 6, 4, 3)[0]
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(image).save(tmp_path / "a.bmp")
    array, encoded = read_image_file(tmp_path / "a.png")
    assert np.array_equal(array, image) and encoded == (tmp_path / "a.png").read_bytes()
    assert read_image_file(tmp_path / "a.bmp")[1] is None  # BMP is re-encoded by ingest
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 8)
    with pytest.raises(CorruptImageError, match="bad.png") as error:
        read_image_file(tmp_path / "bad.png")
    assert error.value.corrupt.path == str(tmp_path / "bad.png") and error.value.corrupt.reason
