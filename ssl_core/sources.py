"""Image sources: the datasets ``sslflow ingest SOURCE`` reads, as a registry of source kinds.

A source lists its records (id, label, origin split) without reading pixels and loads one ``Sample`` at a
time, so ingest assigns splits first and then streams pixels in any order. A kind is one class, decorated
``@register_source("KIND")``: its ``__init__(path)`` opens ``KIND:PATH``; the optional classmethod ``detect``
recognises a bare PATH; ``downloadable = True`` means ``__init__(path, download=True)`` fetches the published
files. ``register_source(NAME, builtin=True)`` registers a source without a path, opened as ``builtin:NAME``.

Kinds: ``folder``, ``npz``, ``cifar10``, ``cifar100``, ``stl10`` (the last three through torchvision's dataset
classes, which check every published file's md5); built-in: ``digits`` (scikit-learn). Only a torchvision
download touches the network, and only with ``download=True``.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.metadata
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np
from PIL import ImageFile
from torchvision.datasets import CIFAR10, CIFAR100, STL10, VisionDataset
from torchvision.datasets.utils import check_integrity

from ssl_core.data import IMAGE_EXTENSIONS, Sample, SourceRecord, read_image_file, scale_16_bit
from ssl_core.registry import Registry


class ImageSource(ABC):
    """A dataset, listed by ``records()`` and read image by image with ``load(index)``."""

    kind: ClassVar[str]
    """Set by ``register_source``: the name in ``KIND:PATH`` / ``builtin:NAME`` and in manifests."""
    description: ClassVar[str]
    """What a path of this kind holds, for the error on a bare path that no kind recognises."""
    downloadable: ClassVar[bool] = False
    detection_rank: ClassVar[int] = 0
    """Auto-detection asks the kinds in ascending rank (then name order); the first that recognises wins."""
    class_names: list[str] | None = None
    """Label names (index = label) when the source knows them."""
    package: ClassVar[str] = ""
    """A built-in source: the package that ships its data (its version is the source's signature)."""

    @classmethod
    def detect(cls, path: Path) -> ImageSource | None:
        """The source at the existing bare ``path`` if it is in this kind's format, else None (default: never)."""
        return None

    @abstractmethod
    def records(self) -> list[SourceRecord]:
        """Ids, labels and origin splits of every image, in a fixed order; reads no pixels."""

    @abstractmethod
    def load(self, index: int) -> Sample:
        """The image at position ``index`` of ``records()``; may raise ``CorruptImageError``."""


SOURCES: Registry[type[ImageSource]] = Registry("source kind")
"""Kinds opened from a path: ``KIND:PATH``, or a bare PATH that the kind's ``detect`` recognises."""
BUILTIN_SOURCES: Registry[type[ImageSource]] = Registry("built-in source")
"""Sources that need no path (``builtin:NAME``); constructed without arguments."""

SourceClass = TypeVar("SourceClass", bound=type[ImageSource])


def register_source(kind: str, *, builtin: bool = False) -> Callable[[SourceClass], SourceClass]:
    """Class decorator: register an ``ImageSource`` subclass as ``kind`` in ``SOURCES`` (or ``BUILTIN_SOURCES``)."""

    def decorator(cls: SourceClass) -> SourceClass:
        (BUILTIN_SOURCES if builtin else SOURCES).register(kind)(cls)
        cls.kind = kind
        return cls

    return decorator


def open_source(source: str, *, download: bool = False, npz_keys: Mapping[str, str] | None = None) -> ImageSource:
    """Resolve a source string to an ``ImageSource``.

    Accepted forms: ``builtin:NAME`` (``BUILTIN_SOURCES``); ``KIND:PATH`` with KIND in ``SOURCES``; or a bare
    PATH, which the kinds' ``detect`` recognise (by ``detection_rank``, then name). ``download=True`` needs
    ``KIND:PATH`` of a downloadable kind and fetches the published files into PATH; without it the network is
    never touched. ``npz_keys`` (``{role: array name}``, see ``NpzSource``) needs an ``.npz`` source.
    """
    prefix, _, rest = source.partition(":")
    named = prefix in SOURCES and bool(rest)
    if npz_keys:
        path = Path(rest if named else source).expanduser()
        if (prefix if named else path.suffix.lower()) not in ("npz", ".npz"):
            raise ValueError(f"npz keys {dict(npz_keys)} were given but the source {source!r} is not an .npz file")
        return NpzSource(path, keys=npz_keys)
    if download and not (named and SOURCES.get(prefix).downloadable):
        downloadable = ", ".join(f"{kind}:PATH" for kind in SOURCES.names() if SOURCES.get(kind).downloadable)
        raise ValueError(f"download is only supported for {downloadable}; got {source!r}")
    if prefix == "builtin":
        if rest not in BUILTIN_SOURCES:
            known = ", ".join(f"builtin:{name}" for name in BUILTIN_SOURCES.names())
            raise ValueError(f"unknown built-in source {source!r}; known: {known}")
        return BUILTIN_SOURCES.get(rest)()
    path = Path(rest if named else source).expanduser()
    if download:
        return SOURCES.get(prefix)(path, download=True)
    if not path.exists():
        raise FileNotFoundError(f"ingest source {str(path)!r} does not exist")
    if named:
        return SOURCES.get(prefix)(path)
    for kind in sorted(SOURCES.names(), key=lambda name: SOURCES.get(name).detection_rank):
        detected = SOURCES.get(kind).detect(path)
        if detected is not None:
            return detected
    expected = "; ".join(f"{kind}: {SOURCES.get(kind).description}" for kind in SOURCES.names())
    raise ValueError(
        f"unknown source format for {'file' if path.is_file() else 'folder'} {str(path)!r}; "
        f"expected one of ({expected}), or name the kind as KIND:PATH"
    )


def source_path(source: str, base: Path | None = None) -> Path | None:
    """The existing file or folder ``source`` names (``KIND:PATH`` or PATH; relative to ``base``, default the working
    directory), or None for a known ``builtin:NAME``. Reads nothing: an unknown built-in name raises ``ValueError``
    listing the known ones, a path that does not exist ``FileNotFoundError`` naming it."""
    prefix, _, rest = source.partition(":")
    if prefix == "builtin":
        if rest not in BUILTIN_SOURCES:
            known = ", ".join(f"builtin:{name}" for name in BUILTIN_SOURCES.names())
            raise ValueError(f"unknown built-in source {source!r}; known: {known}")
        return None
    path = Path(rest if prefix in SOURCES and rest else source).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.exists():
        raise FileNotFoundError(f"ingest source {str(path)!r} does not exist")
    return path


SIGNATURE_HASH_BYTES = 1 << 30
"""A source file up to this size is hashed whole for its signature; a bigger one by size and mtime only."""


def source_signature(source: str) -> str:
    """A cheap signature of what ``source`` (as ``open_source`` takes it) holds now, without decoding any image:
    it changes when the source's content does, so a changed source is ingested again.

    - ``builtin:NAME``: the name and the version of the package that ships the data (``package``).
    - a folder (image folder, CIFAR/STL-10 files): sha256 of the sorted list of every non-hidden file under it
      (relative path, size, mtime in ns), so adding, removing, replacing or touching a file changes it.
    - a file (``.npz``): size, mtime and the sha256 of its bytes (size and mtime only above
      ``SIGNATURE_HASH_BYTES``).
    Errors as ``source_path``.
    """
    path = source_path(source)
    if path is None:
        name = source.partition(":")[2]
        package = BUILTIN_SOURCES.get(name).package
        return f"builtin:{name}@{package}=={importlib.metadata.version(package)}"
    digest = hashlib.sha256()
    if path.is_file():
        stat = path.stat()
        digest.update(f"file {stat.st_size} {stat.st_mtime_ns}\n".encode())
        if stat.st_size <= SIGNATURE_HASH_BYTES:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return f"file:sha256:{digest.hexdigest()}"
    for directory, folders, files in os.walk(path):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                file = Path(directory, name)
                stat = file.stat()
                digest.update(f"{file.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"folder:sha256:{digest.hexdigest()}"


@register_source("folder")
class ImageFolderSource(ImageSource):
    """A folder of image files (.png, .jpg, .jpeg, .bmp, .webp; case-insensitive; hidden files ignored).

    - Class sub-folders (``root/cat/*.png``, searched recursively): labels are the positions of the
      sub-folder names in sorted order; sub-folders holding no image are not classes.
    - Flat folder (``root/*.png``): every image is unlabeled (label None).
    A folder with both loose images and class sub-folders is ambiguous and rejected. Ids are the paths
    relative to ``root`` (POSIX separators). The folder has no train/test split of its own. This is the only
    source whose pixels can be damaged on disk: ``load`` raises ``CorruptImageError`` for such a file.
    Auto-detection: any folder holding images, asked after every other kind.
    """

    description = f"a folder of images ({', '.join(IMAGE_EXTENSIONS)}), flat or in class sub-folders"
    detection_rank = 1

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            raise ValueError(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; truncated images would be "
                "silently padded instead of reported as corrupt. Leave it at its default False."
            )

    @classmethod
    def detect(cls, path: Path) -> ImageSource | None:
        if not path.is_dir():
            return None
        folder = cls(path)
        return folder if folder.records() else None

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
    """Images in uint8 or uint16 arrays, in parts: ``(name for error messages, images (N, H, W[, C]), N records)``.

    Every part has shape (N, H, W), (N, H, W, 1) or (N, H, W, 3), and all parts one image shape. A uint16 part
    (16-bit scans, microscopy) is loaded scaled to 8 bits by its bit depth (``scale_16_bit``: v * 255 / 65535).
    """

    def __init__(
        self, parts: Sequence[tuple[str, np.ndarray, list[SourceRecord]]], class_names: list[str] | None = None
    ) -> None:
        self._images: list[np.ndarray] = []
        self._starts: list[int] = []  # position in records() of each part's first image
        self._records: list[SourceRecord] = []
        for name, images, records in parts:
            if images.dtype not in (np.uint8, np.uint16):
                raise ValueError(f"{name} must be uint8 or uint16, got {images.dtype}")
            if images.ndim == 3:
                images = images[:, :, :, None]
            if images.ndim != 4 or images.shape[3] not in (1, 3):
                raise ValueError(f"{name} must have shape (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {images.shape}")
            if len(images) != len(records):
                raise ValueError(f"{name}: {len(images)} images but {len(records)} records")
            self._images.append(images)
            self._starts.append(len(self._records))
            self._records.extend(records)
        shapes = {images.shape[1:] for images in self._images}
        if len(shapes) > 1:
            raise ValueError(f"{' and '.join(name for name, *_ in parts)} have different image shapes {sorted(shapes)}")
        self.class_names = class_names

    def records(self) -> list[SourceRecord]:
        return self._records

    def load(self, index: int) -> Sample:
        part = bisect.bisect_right(self._starts, index) - 1
        record = self._records[index]
        image = np.ascontiguousarray(self._images[part][index - self._starts[part]])
        if image.dtype == np.uint16:
            image = scale_16_bit(image)
        return Sample(record.id, image, record.label, record.origin_split)


def _labels_to_records(
    prefix: str, labels: np.ndarray | Sequence[int] | None, count: int, origin_split: str | None
) -> list[SourceRecord]:
    """Records ``{prefix}/{i:0Nd}`` (N digits of ``count - 1``); ``labels`` None -> unlabeled.

    Labels must be non-negative integers.
    """
    width = max(1, len(str(max(count - 1, 0))))
    if labels is None:
        return [SourceRecord(f"{prefix}/{i:0{width}d}", None, origin_split) for i in range(count)]
    labels = np.asarray(labels)
    if labels.shape != (count,):
        raise ValueError(f"{prefix}: expected {count} labels, got shape {labels.shape}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise ValueError(f"{prefix}: labels must be non-negative integers (dtype {labels.dtype})")
    return [SourceRecord(f"{prefix}/{i:0{width}d}", int(label), origin_split) for i, label in enumerate(labels)]


NPZ_KEY_NAMES: dict[str, tuple[str, ...]] = {
    "x": ("x", "x_train", "X", "X_train", "images", "train_images"),
    "y": ("y", "y_train", "Y", "Y_train", "labels", "train_labels"),
    "x_test": ("x_test", "X_test", "test_images"),
    "y_test": ("y_test", "Y_test", "test_labels"),
}
"""The array names an ``.npz`` is searched for, per role (what ``numpy.savez`` users commonly write)."""


def npz_array_names(available: Sequence[str], keys: Mapping[str, str] | None, where: str) -> dict[str, str]:
    """``{role: array name}`` of an ``.npz`` holding the arrays ``available``, for the roles it has.

    A role named in ``keys`` (e.g. ``{"x": "train_images"}``) takes that array, which must exist; any other role
    takes the one array of ``available`` whose name is in ``NPZ_KEY_NAMES[role]`` (two candidates: ambiguous,
    ``ValueError``). ``x`` is required; ``y_test`` needs ``x_test``. Errors name ``where`` and the file's arrays.
    """
    keys = dict(keys or {})
    listing = f"(arrays in the file: {', '.join(available) or 'none'})"
    unknown = sorted(set(keys) - set(NPZ_KEY_NAMES))
    if unknown:
        raise ValueError(f"{where}: unknown npz key role {unknown[0]!r}; roles: {', '.join(NPZ_KEY_NAMES)}")
    names: dict[str, str] = {}
    for role, name in keys.items():
        if name not in available:
            raise ValueError(f"{where}: no array {name!r} for {role} {listing}")
        names[role] = name
    claimed = set(names.values())
    for role, candidates in NPZ_KEY_NAMES.items():
        if role in names:
            continue
        found = [name for name in candidates if name in available and name not in claimed]
        if len(found) > 1:
            raise ValueError(f"{where}: arrays {' and '.join(map(repr, found))} could both be {role}; name one with "
                             f"--npz-key {role}=NAME")
        if found:
            names[role] = found[0]
            claimed.add(found[0])
    if "x" not in names:
        raise ValueError(f"{where}: no image array {listing}; expected one of {', '.join(NPZ_KEY_NAMES['x'])}, "
                         "or name it with --npz-key x=NAME")
    if "y_test" in names and "x_test" not in names:
        raise ValueError(f"{where}: test labels {names['y_test']!r} but no test images {listing}; name them with "
                         "--npz-key x_test=NAME")
    return names


def _channels_last(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) with C in {1, 3} (PyTorch's layout) -> (N, H, W, C); anything else unchanged."""
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        return images.transpose(0, 2, 3, 1)
    return images


@register_source("npz")
class NpzSource(ArraySource):
    """A NumPy ``.npz``: train images (N, H, W[, C]) uint8 (or uint16, scaled to 8 bits) and optional labels (N,) or
    (N, 1) of non-negative ints.

    The arrays are found by name (``NPZ_KEY_NAMES``: ``x`` or ``x_train``, ``y`` or ``y_train``, ``x_test``,
    ``y_test``, ...) or named by ``keys`` (``{"x": "train_images", "y_test": "labels_test"}``; the CLI's
    ``--npz-key ROLE=NAME``). Images in PyTorch's (N, C, H, W) layout are transposed. With test images the file
    carries its own split (train and test); without them the origin split is None. Other arrays (e.g. file
    names) are ignored. Ids: ``{file stem}/{i}`` or ``{file stem}/train/{i}`` and ``{file stem}/test/{i}``.
    Auto-detection: a file ending in ``.npz``.
    """

    description = "an .npz file with train images ('x' or 'x_train', ...) uint8, optional labels and test arrays"

    def __init__(self, path: Path, keys: Mapping[str, str] | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"npz file {path} does not exist")
        with np.load(path, allow_pickle=False) as arrays:
            names = npz_array_names(arrays.files, keys, str(path))
            roles = [("x", "y", "train"), ("x_test", "y_test", "test")] if "x_test" in names else [("x", "y", None)]
            parts = []
            for x_role, y_role, origin in roles:
                images = _channels_last(arrays[names[x_role]])
                labels = arrays[names[y_role]] if y_role in names else None
                if labels is not None and labels.ndim == 2 and labels.shape[1] == 1:
                    labels = labels[:, 0]  # Keras' (N, 1)
                prefix = path.stem if origin is None else f"{path.stem}/{origin}"
                parts.append((f"{path}: '{names[x_role]}'", images,
                              _labels_to_records(prefix, labels, len(images), origin)))
        self.array_names = names
        super().__init__(parts)

    @classmethod
    def detect(cls, path: Path) -> ImageSource | None:
        return cls(path) if path.is_file() and path.suffix.lower() == ".npz" else None


@register_source("digits", builtin=True)
class DigitsSource(ArraySource):
    """scikit-learn's bundled optical handwritten digits (``builtin:digits``).

    1797 real 8x8 grayscale scans of handwritten digits, 10 classes (0-9, about 180 each), from the UCI
    Machine Learning Repository ("Optical Recognition of Handwritten Digits", Alpaydin & Kaynak, 1998).
    The data ships inside the scikit-learn package (``sklearn.datasets.load_digits``), so no network is
    needed. Pixel values 0..16 are rescaled to 0..255. It has no train/test split of its own.
    Ids: ``digits/0000``.
    """

    package = "scikit-learn"

    def __init__(self) -> None:
        from sklearn.datasets import load_digits  # lazy: scikit-learn is only needed for this source

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        records = _labels_to_records("digits", digits.target.astype(np.int64), len(images), None)
        super().__init__([("digits", images, records)], [str(name) for name in digits.target_names])


class TorchvisionSource(ArraySource):
    """A dataset in its published files, read (and with ``download=True`` fetched) by ``dataset_class``.

    PATH is the published folder (``dataset_class.base_folder``) or its parent. torchvision checks the md5 of
    every published file (``published_files``): a missing file raises ``FileNotFoundError``, a mismatching
    one ``ValueError``, both naming the files. Auto-detection: PATH holds any published file.
    """

    dataset_class: ClassVar[type[VisionDataset]]
    downloadable = True

    @classmethod
    def published_files(cls) -> list[tuple[str, str]]:
        """(file name, md5) of every file torchvision checks."""
        return [(name, md5) for name, md5 in cls.dataset_class.train_list + cls.dataset_class.test_list]

    @classmethod
    def dataset_root(cls, path: Path) -> Path:
        """The folder torchvision reads from (the parent of the published folder), given either."""
        base = cls.dataset_class.base_folder
        return path.parent if path.name == base and not (path / base).is_dir() else path

    @classmethod
    def detect(cls, path: Path) -> ImageSource | None:
        folder = cls.dataset_root(path) / cls.dataset_class.base_folder
        return cls(path) if any((folder / name).is_file() for name, _ in cls.published_files()) else None

    def open_published(self, path: Path, download: bool, **split: object) -> VisionDataset:
        """``dataset_class(root, download=download, **split)``; errors name the missing or damaged files."""
        root = self.dataset_root(Path(path))
        folder = root / self.dataset_class.base_folder
        missing = [name for name, _ in self.published_files() if not (folder / name).is_file()]
        if missing and not download:
            raise FileNotFoundError(f"no {self.kind} files {', '.join(missing)} in {folder}")
        try:
            return self.dataset_class(str(root), download=download, **split)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
            files = [(folder / name, md5) for name, md5 in self.published_files()]
            damaged = [str(file) for file, md5 in files if not check_integrity(str(file), md5)]
            if not damaged:
                raise
            raise ValueError(
                f"{self.kind} source {str(path)!r}: {', '.join(damaged)} missing or not matching the published "
                f"md5 checksum (damaged, or not the published {self.kind} files)"
            ) from error


@register_source("cifar10")
class Cifar10Source(TorchvisionSource):
    """CIFAR-10 (torchvision ``CIFAR10``): the published python batches in ``cifar-10-batches-py``.

    Train and test keep their published split. Ids: ``cifar10/train/00000``, ``cifar10/test/0000``.
    """

    description = "CIFAR-10 python batches (cifar-10-batches-py or its parent folder)"
    dataset_class = CIFAR10

    @classmethod
    def published_files(cls) -> list[tuple[str, str]]:
        meta = cls.dataset_class.meta
        return super().published_files() + [(meta["filename"], meta["md5"])]

    def __init__(self, path: Path, *, download: bool = False) -> None:
        parts = []
        for origin in ("train", "test"):
            dataset = self.open_published(path, download, train=origin == "train")
            labels = np.asarray(dataset.targets, dtype=np.int64)
            records = _labels_to_records(f"{self.kind}/{origin}", labels, len(dataset.data), origin)
            parts.append((f"{self.kind} {origin}", dataset.data, records))
        super().__init__(parts, list(dataset.classes))


@register_source("cifar100")
class Cifar100Source(Cifar10Source):
    """CIFAR-100 (torchvision ``CIFAR100``) with its 100 fine labels, from ``cifar-100-python``."""

    description = "CIFAR-100 python batches (cifar-100-python or its parent folder)"
    dataset_class = CIFAR100


@register_source("stl10")
class Stl10Source(TorchvisionSource):
    """STL-10 (torchvision ``STL10``): the published binaries in ``stl10_binary``.

    Labels 1..10 in the files become 0..9. The 100,000 unlabeled images belong to the train split with label
    None. torchvision reads each ``*_X.bin`` whole into memory (the unlabeled part is about 2.8 GB).
    Ids: ``stl10/train/0000``, ``stl10/test/0000``, ``stl10/unlabeled/00000``.
    """

    description = "STL-10 binaries (stl10_binary or its parent folder)"
    dataset_class = STL10

    def __init__(self, path: Path, *, download: bool = False) -> None:
        parts = []
        for split, origin in (("train", "train"), ("test", "test"), ("unlabeled", "train")):
            dataset = self.open_published(path, download, split=split)
            labels = None if split == "unlabeled" else dataset.labels.astype(np.int64)
            images = dataset.data.transpose(0, 2, 3, 1)  # torchvision's (N, C, H, W) -> (N, H, W, C)
            parts.append((f"stl10 {split}", images, _labels_to_records(f"stl10/{split}", labels, len(images), origin)))
        # torchvision sets ``classes`` only when stl10_binary/class_names.txt exists.
        super().__init__(parts, getattr(dataset, "classes", None))
