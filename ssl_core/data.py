"""The image data contract: Parquet schema, PNG encoding, batched decoding, and dataset sources.

One Parquet row per image (see DESIGN.md, "Data contract")::

    id: string, image: binary (PNG/JPEG bytes), label: int32 (null = unlabeled), split: string

A *source* turns something on disk (an image folder, CIFAR-10/100 pickles, STL-10 binaries, an ``.npz``
array file) or the built-in ``digits`` set into ``Sample`` objects: ``(id, image (H, W, C) uint8, label or
None, origin split "train"/"test"/None)``. Sources list their records (ids, labels, origin splits) without
reading pixels, so the ingest stage can assign splits first and then stream pixels in any order with
``load(index)``. Image folders are the only source whose pixels can be damaged on disk: a file that PIL
cannot verify and fully load raises ``CorruptImageError`` from ``load`` and is skipped (and listed) by
``ImageSource.samples``.

This module uses numpy, PIL, pyarrow and torch only (scikit-learn is imported lazily for ``digits``);
it never imports Ray or MLflow and never touches the network.
"""

from __future__ import annotations

import io
import pickle
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

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

ORIGIN_SPLITS = ("train", "test")


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
    """Raised by ``ImageSource.load`` for an image file that cannot be decoded."""

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


def decode_rgb(data: bytes, image_size: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to an RGB uint8 array, optionally resized (see ``decode_images``).

    Shape: (H, W, 3), or (image_size, image_size, 3). Raises whatever PIL raises on damaged bytes.
    """
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        image = opened.convert("RGB")
    if image_size is not None:
        image = _resize_center_crop(image, image_size)
    return np.asarray(image, dtype=np.uint8)


def decode_images(encoded: Sequence[bytes], image_size: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Decode a batch of encoded images into one uint8 tensor; never raises on a damaged image.

    Grayscale (and palette, RGBA, CMYK) images are converted to RGB. With ``image_size``, each image is
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
    """PIL image -> (H, W, 1) for grayscale modes, (H, W, 3) for everything else (converted to RGB)."""
    if image.mode in ("1", "L"):
        return np.asarray(image.convert("L"), dtype=np.uint8)[:, :, None]
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_image_file(path: Path) -> tuple[np.ndarray, bytes | None]:
    """Verify and fully decode one image file.

    Returns ``(image (H, W, C) uint8, original bytes if PNG/JPEG in mode L/RGB else None)``.
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
            array = _as_hwc_uint8(opened)
    except Exception as error:  # noqa: BLE001 - any decoder failure makes this one file corrupt
        message = "cannot identify image file" if isinstance(error, UnidentifiedImageError) else str(error)
        reason = f"{type(error).__name__}: {message}".strip().rstrip(":")
        raise CorruptImageError(CorruptImage(str(path), reason)) from error
    keep_bytes = image_format in ("PNG", "JPEG") and mode in ("L", "RGB")
    return array, (data if keep_bytes else None)


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


class ImageSource(ABC):
    """A dataset on disk, listed by ``records()`` and read image by image with ``load(index)``.

    ``kind`` names the source type in manifests; ``class_names`` gives label names (index = label) when
    the source knows them.
    """

    kind: str

    @property
    def class_names(self) -> list[str] | None:
        return None

    @abstractmethod
    def records(self) -> list[SourceRecord]:
        """Ids, labels and origin splits of every image, in a fixed order; reads no pixels."""

    @abstractmethod
    def load(self, index: int) -> Sample:
        """The image at position ``index`` of ``records()``; may raise ``CorruptImageError``."""

    def samples(
        self, order: Iterable[int] | None = None, corrupt: list[CorruptImage] | None = None
    ) -> Iterator[Sample]:
        """Yield samples in ``order`` (default: records order), skipping corrupt images.

        Each skipped image is appended to ``corrupt`` when a list is given.
        """
        indices = range(len(self.records())) if order is None else order
        for index in indices:
            try:
                yield self.load(index)
            except CorruptImageError as error:
                if corrupt is not None:
                    corrupt.append(error.corrupt)

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()


class ImageFolderSource(ImageSource):
    """A folder of image files (.png, .jpg, .jpeg, .bmp, .webp; case-insensitive; hidden files ignored).

    - Class sub-folders (``root/cat/*.png``, searched recursively): labels are the positions of the
      sub-folder names in sorted order; sub-folders holding no image are not classes.
    - Flat folder (``root/*.png``): every image is unlabeled (label None).
    A folder with both loose images and class sub-folders is ambiguous and rejected. Ids are the paths
    relative to ``root`` (POSIX separators). The folder has no train/test split of its own.
    """

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            raise ValueError(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; truncated images would be "
                "silently padded instead of reported as corrupt. Leave it at its default False."
            )

    @staticmethod
    def _is_image(path: Path) -> bool:
        return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS

    @cached_property
    def _files(self) -> tuple[list[Path], list[int | None], list[str] | None]:
        loose = sorted(path for path in self.root.iterdir() if self._is_image(path))
        class_dirs = sorted(
            path for path in self.root.iterdir() if path.is_dir() and not path.name.startswith(".")
        )
        class_files = {
            directory.name: sorted(
                path
                for path in directory.rglob("*")
                if self._is_image(path) and not any(part.startswith(".") for part in path.relative_to(directory).parts)
            )
            for directory in class_dirs
        }
        class_files = {name: files for name, files in class_files.items() if files}
        if loose and class_files:
            raise ValueError(
                f"image folder {self.root} has both loose images and class sub-folders "
                f"({', '.join(sorted(class_files))}); use one layout"
            )
        if loose:
            return loose, [None] * len(loose), None
        names = sorted(class_files)
        files: list[Path] = []
        labels: list[int | None] = []
        for label, name in enumerate(names):
            files.extend(class_files[name])
            labels.extend([label] * len(class_files[name]))
        return files, labels, names

    @property
    def class_names(self) -> list[str] | None:
        return self._files[2]

    def records(self) -> list[SourceRecord]:
        files, labels, _ = self._files
        return [
            SourceRecord(path.relative_to(self.root).as_posix(), label, None)
            for path, label in zip(files, labels, strict=True)
        ]

    def load(self, index: int) -> Sample:
        files, labels, _ = self._files
        path = files[index]
        image, encoded = read_image_file(path)
        return Sample(path.relative_to(self.root).as_posix(), image, labels[index], None, encoded)


class ArraySource(ImageSource):
    """Images already in memory (or memory-mapped): (N, H, W, C) uint8 plus per-image records."""

    def __init__(
        self, kind: str, images: np.ndarray, records: list[SourceRecord], class_names: list[str] | None = None
    ) -> None:
        if images.dtype != np.uint8:
            raise ValueError(f"{kind} images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images[:, :, :, None]
        if images.ndim != 4 or images.shape[3] not in (1, 3):
            raise ValueError(
                f"{kind} images must have shape (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {images.shape}"
            )
        if len(images) != len(records):
            raise ValueError(f"{kind}: {len(images)} images but {len(records)} records")
        self.kind = kind
        self.images = images
        self._records = records
        self._class_names = class_names

    @property
    def class_names(self) -> list[str] | None:
        return self._class_names

    def records(self) -> list[SourceRecord]:
        return self._records

    def load(self, index: int) -> Sample:
        record = self._records[index]
        return Sample(record.id, np.asarray(self.images[index]), record.label, record.origin_split)


def _labels_to_records(
    prefix: str, labels: np.ndarray | Sequence[int] | None, count: int, origin_split: str | None
) -> list[SourceRecord]:
    """Records ``{prefix}/{i:0Nd}``; ``labels`` None -> unlabeled. Labels must be non-negative integers."""
    width = max(1, len(str(max(count - 1, 0))))
    if labels is None:
        return [SourceRecord(f"{prefix}/{i:0{width}d}", None, origin_split) for i in range(count)]
    labels = np.asarray(labels)
    if labels.shape != (count,):
        raise ValueError(f"{prefix}: expected {count} labels, got shape {labels.shape}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise ValueError(f"{prefix}: labels must be non-negative integers (dtype {labels.dtype})")
    return [SourceRecord(f"{prefix}/{i:0{width}d}", int(label), origin_split) for i, label in enumerate(labels)]


def _unpickle(path: Path) -> dict[bytes, object]:
    """Load one CIFAR python batch (a pickled dict with bytes keys, as published by its authors)."""
    with path.open("rb") as handle:
        return pickle.load(handle, encoding="bytes")  # noqa: S301 - the published CIFAR format is pickle


def _cifar_images(batch: dict[bytes, object]) -> np.ndarray:
    """CIFAR rows of 3072 bytes (R plane, G plane, B plane, each 32x32 row-major) -> (N, 32, 32, 3)."""
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


CIFAR_LAYOUTS = {
    # kind: (folder name, train files, test files, label key, meta file, label-names key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        "batches.meta",
        b"label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"),
}


def cifar_folder(root: Path, kind: str) -> Path | None:
    """The published CIFAR folder at or directly under ``root`` (``cifar-10-batches-py`` /
    ``cifar-100-python``), or None."""
    folder_name, train_files, test_files, *_ = CIFAR_LAYOUTS[kind]
    for candidate in (root, root / folder_name):
        if all((candidate / name).is_file() for name in train_files + test_files):
            return candidate
    return None


def cifar_source(root: Path, kind: str = "cifar10") -> ArraySource:
    """CIFAR-10 or CIFAR-100 from the published python-pickle batches (local files only).

    ``root`` is the ``cifar-10-batches-py`` / ``cifar-100-python`` folder or its parent. Train and test
    keep their published split; CIFAR-100 uses the 100 fine labels. Ids: ``{kind}/train/00000``.
    """
    if kind not in CIFAR_LAYOUTS:
        raise ValueError(f"unknown CIFAR kind {kind!r}; known: {', '.join(CIFAR_LAYOUTS)}")
    folder = cifar_folder(Path(root), kind)
    _, train_files, test_files, label_key, meta_file, names_key = CIFAR_LAYOUTS[kind]
    if folder is None:
        raise FileNotFoundError(f"no {kind} python batches ({', '.join(train_files + test_files)}) in {root}")
    images: list[np.ndarray] = []
    records: list[SourceRecord] = []
    for origin, names in (("train", train_files), ("test", test_files)):
        batches = [_unpickle(folder / name) for name in names]
        split_images = np.concatenate([_cifar_images(batch) for batch in batches])
        split_labels = np.concatenate([np.asarray(batch[label_key], dtype=np.int64) for batch in batches])
        images.append(split_images)
        records.extend(_labels_to_records(f"{kind}/{origin}", split_labels, len(split_images), origin))
    class_names = None
    if (folder / meta_file).is_file():
        class_names = [name.decode() for name in _unpickle(folder / meta_file)[names_key]]  # type: ignore[attr-defined]
    return ArraySource(kind, np.concatenate(images), records, class_names)


def stl10_folder(root: Path) -> Path | None:
    """The published ``stl10_binary`` folder at or directly under ``root``, or None."""
    for candidate in (root, root / "stl10_binary"):
        if (candidate / "train_X.bin").is_file() or (candidate / "unlabeled_X.bin").is_file():
            return candidate
    return None


def _read_stl_images(path: Path) -> np.ndarray:
    """STL-10 ``*_X.bin``: 96x96x3 images, each stored channel by channel in column-major order.

    Memory-mapped, returned as a (N, 96, 96, 3) view (as the dataset's own reader does:
    reshape (-1, 3, 96, 96) then transpose (0, 3, 2, 1)).
    """
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if raw.size % (3 * 96 * 96):
        raise ValueError(f"{path}: size {raw.size} is not a multiple of 3*96*96")
    return raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)


class Stl10Source(ImageSource):
    """STL-10 from the published binaries (``stl10_binary``: train_X/y.bin, test_X/y.bin, unlabeled_X.bin).

    Labels in ``*_y.bin`` are 1..10 and become 0..9. The 100,000 unlabeled images belong to the train
    split with label None. Pixels are memory-mapped, so nothing large is held in memory.
    Ids: ``stl10/train/0000``, ``stl10/test/0000``, ``stl10/unlabeled/00000``.
    """

    kind = "stl10"

    def __init__(self, root: Path) -> None:
        folder = stl10_folder(Path(root))
        if folder is None:
            raise FileNotFoundError(f"no STL-10 binaries (train_X.bin / unlabeled_X.bin) in {root}")
        self.folder = folder
        self._parts: list[tuple[np.ndarray, int]] = []  # (images view, first record index)
        self._records: list[SourceRecord] = []
        for part, origin in (("train", "train"), ("test", "test"), ("unlabeled", "train")):
            x_path = folder / f"{part}_X.bin"
            if not x_path.is_file():
                continue
            images = _read_stl_images(x_path)
            labels = None
            if part != "unlabeled":
                y_path = folder / f"{part}_y.bin"
                if not y_path.is_file():
                    raise FileNotFoundError(f"{x_path} has no label file {y_path}")
                labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
            self._parts.append((images, len(self._records)))
            self._records.extend(_labels_to_records(f"stl10/{part}", labels, len(images), origin))

    @property
    def class_names(self) -> list[str] | None:
        names_path = self.folder / "class_names.txt"
        if not names_path.is_file():
            return None
        return [line.strip() for line in names_path.read_text().splitlines() if line.strip()]

    def records(self) -> list[SourceRecord]:
        return self._records

    def load(self, index: int) -> Sample:
        record = self._records[index]
        for images, start in reversed(self._parts):
            if index >= start:
                return Sample(record.id, np.ascontiguousarray(images[index - start]), record.label, record.origin_split)
        raise IndexError(index)


def npz_source(path: Path) -> ArraySource:
    """A NumPy ``.npz`` with ``x`` (N, H, W[, C]) uint8 and optional ``y`` (N,) non-negative integer labels.

    With ``x_test`` (and optional ``y_test``) the file carries its own split: ``x`` is train, ``x_test`` is
    test; without it the origin split is None. Other keys (e.g. file names) are ignored. Ids:
    ``{file stem}/{i}`` or ``{file stem}/train/{i}`` and ``{file stem}/test/{i}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file {path} does not exist")
    with np.load(path, allow_pickle=False) as arrays:
        if "x" not in arrays:
            raise ValueError(f"{path} has no array 'x' (keys: {', '.join(arrays.files)})")
        parts = [("x", "y", "train" if "x_test" in arrays else None)]
        if "x_test" in arrays:
            parts.append(("x_test", "y_test", "test"))
        images: list[np.ndarray] = []
        records: list[SourceRecord] = []
        for x_key, y_key, origin in parts:
            x = arrays[x_key]
            if x.dtype != np.uint8:
                raise ValueError(f"{path}: '{x_key}' must be uint8, got {x.dtype}")
            if x.ndim == 3:
                x = x[:, :, :, None]
            if x.ndim != 4 or x.shape[3] not in (1, 3):
                raise ValueError(f"{path}: '{x_key}' must have shape (N, H, W) or (N, H, W, 1|3), got {x.shape}")
            labels = arrays[y_key] if y_key in arrays else None
            prefix = path.stem if origin is None else f"{path.stem}/{origin}"
            images.append(x)
            records.extend(_labels_to_records(prefix, labels, len(x), origin))
    if len({image.shape[1:] for image in images}) > 1:
        raise ValueError(f"{path}: 'x' and 'x_test' have different image shapes")
    return ArraySource("npz", np.concatenate(images), records)


def digits_source() -> ArraySource:
    """The built-in source ``digits``: scikit-learn's bundled optical handwritten digits.

    1797 real 8x8 grayscale scans of handwritten digits, 10 classes (0-9, about 180 each), from the UCI
    Machine Learning Repository ("Optical Recognition of Handwritten Digits", Alpaydin & Kaynak, 1998).
    The data ships inside the scikit-learn package (``sklearn.datasets.load_digits``), so no network is
    needed. Pixel values 0..16 are rescaled to 0..255. It has no train/test split of its own.
    Ids: ``digits/0000``.
    """
    from sklearn.datasets import load_digits  # lazy: scikit-learn is only needed for this source

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    records = _labels_to_records("digits", digits.target.astype(np.int64), len(images), None)
    return ArraySource("digits", images, records, [str(name) for name in digits.target_names])


BUILTIN_SOURCES = {"digits": digits_source}
