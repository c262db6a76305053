"""The serving contract of a registered sslflow model, in plain PyTorch: image bytes in, class names with
probabilities (a classifier) or L2-normalised features (an encoder) out.

A served model is a folder with two files:

- ``serving.json``: the ``ServingSpec`` (what the model is, how to rebuild its architecture, the image size and
  mean/std evaluation used, the class names);
- ``weights.pt``: the module's ``state_dict``, read back with ``torch.load(..., weights_only=True)``.

Nothing is pickled, so loading needs ``ssl_core``, torch, numpy and Pillow only. MLflow's ``python_function``
flavour loads the folder through this module's ``_load_pyfunc(path)`` (``loader_module="ssl_core.serving"``, with
``ssl_core`` shipped in the model's ``code_paths``), which returns a ``Predictor``.

Preprocessing is evaluation's, exactly: decode to RGB, bilinear resize of the shorter side to ``image_size`` and
centre crop (``ssl_core.data.decode_rgb``), scale to [0, 1], ``(x - mean) / std``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ssl_core.augment import Normalization
from ssl_core.data import _resize_center_crop, decode_rgb

SPEC_FILE = "serving.json"
WEIGHTS_FILE = "weights.pt"
KINDS = ("classifier", "encoder")
BUILDERS = ("student", "method_classifier", "method_encoder")
MAX_SIDE = 4096
"""Largest accepted image side (pixels) before resizing; a bigger payload is refused as bad input."""


class BadInput(ValueError):
    """A request the model cannot answer (not an image, a wrong shape, an empty batch): the client's fault."""


@dataclass(frozen=True)
class ServingSpec:
    """What a served model is and how to rebuild it.

    ``architecture`` is a recipe for ``build_module``: ``{"builder": "student", "backbone", "num_classes"}``,
    ``{"builder": "method_classifier", "method", "method_config", "train_rows", "head_layers", "num_classes"}`` or
    ``{"builder": "method_encoder", "method", "method_config", "train_rows"}``.
    """

    kind: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    architecture: dict[str, Any]
    class_names: tuple[str, ...] = ()
    """Index -> name of the classifier's classes (empty for an encoder)."""
    description: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (method, dataset hash, metrics) shown to whoever loads the model."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {KINDS}")
        if self.image_size <= 0:
            raise ValueError(f"image_size={self.image_size} must be positive")
        if self.architecture.get("builder") not in BUILDERS:
            raise ValueError(f"architecture.builder={self.architecture.get('builder')!r} must be one of {BUILDERS}")
        if self.kind == "classifier" and len(self.class_names) != self.architecture.get("num_classes"):
            raise ValueError(f"{len(self.class_names)} class_names for num_classes="
                             f"{self.architecture.get('num_classes')}")

    def normalization(self) -> Normalization:
        return Normalization(tuple(self.mean), tuple(self.std))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServingSpec:
        values = json.loads(text)
        return cls(kind=values["kind"], image_size=int(values["image_size"]), mean=tuple(values["mean"]),
                   std=tuple(values["std"]), architecture=values["architecture"],
                   class_names=tuple(values.get("class_names", ())), description=values.get("description", {}))


def build_module(spec: ServingSpec) -> nn.Module:
    """A freshly initialised module of ``spec.architecture`` (weights are loaded separately)."""
    from ssl_core.classifier import classifier_from_method, student_classifier
    from ssl_core.methods import build_method

    recipe = spec.architecture
    if recipe["builder"] == "student":
        return student_classifier(recipe["backbone"], spec.image_size, int(recipe["num_classes"]), mean=spec.mean,
                                  std=spec.std)
    method = build_method(recipe["method"], recipe["method_config"], train_rows=recipe.get("train_rows"))
    if recipe["builder"] == "method_encoder":
        return method.encoder
    return classifier_from_method(method, int(recipe["head_layers"]), int(recipe["num_classes"]))


def save_served_model(directory: str | Path, module: nn.Module, spec: ServingSpec) -> Path:
    """Write ``spec`` and ``module``'s weights to ``directory``, then rebuild the module from them and check that it
    gives ``module``'s outputs on a seeded batch (``RuntimeError`` otherwise: the recipe does not describe it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    (directory / SPEC_FILE).write_text(spec.to_json())
    rebuilt, _ = load_served_module(directory)
    probe = torch.randn(2, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            first_param = next(module.parameters())
            expected = module(probe.to(first_param.device, first_param.dtype)).float().cpu()
            actual = rebuilt(probe)
    finally:
        module.train(was_training)
    if expected.shape != actual.shape or not torch.allclose(expected, actual, atol=1e-5, rtol=1e-4):
        raise RuntimeError(f"the module rebuilt from {directory / SPEC_FILE} does not reproduce the saved one "
                           f"(max abs difference {(expected - actual).abs().max().item():.3g})")
    return directory


def load_served_module(directory: str | Path) -> tuple[nn.Module, ServingSpec]:
    """``(module in eval mode on the CPU, spec)`` of a served-model folder."""
    directory = Path(directory)
    spec = ServingSpec.from_json((directory / SPEC_FILE).read_text())
    module = build_module(spec)
    module.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return module.eval(), spec


# ------------------------------------------------------------------------------------------------ preprocessing


def _array_to_hwc(value: Any, row: int) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError as error:  # ragged nested lists
        raise BadInput(f"row {row}: an image array must be rectangular ({error})") from None
    if array.dtype == object:
        raise BadInput(f"row {row}: an image array must hold numbers 0..255")
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iu" or array.size == 0 or array.min() < 0 or array.max() > 255:
            raise BadInput(f"row {row}: an image array must hold uint8 values 0..255, got dtype {array.dtype}")
        array = array.astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim != 3 or array.shape[2] not in (1, 3) or min(array.shape[:2]) == 0:
        raise BadInput(f"row {row}: an image array must have shape (H, W), (H, W, 3) or (3, H, W), "
                       f"got {tuple(np.asarray(value).shape)}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if max(array.shape[:2]) > MAX_SIDE:
        raise BadInput(f"row {row}: image of {array.shape[1]}x{array.shape[0]} pixels exceeds {MAX_SIDE} per side")
    return np.ascontiguousarray(array)


_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+")


def _unwrap_base64(data: bytes) -> bytes:
    """``data`` decoded if it is base64 text, else ``data``. MLflow's scoring server decodes a binary column's base64
    for ``dataframe_split`` / ``dataframe_records`` requests but hands it over as the text's bytes for ``instances``
    / ``inputs``; encoded images never consist of base64 characters only (PNG starts with 0x89, JPEG with 0xFF)."""
    if not _BASE64_TEXT.fullmatch(data):
        return data
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        return data


def decode_value(value: Any, image_size: int, row: int = 0) -> np.ndarray:
    """One request value -> (image_size, image_size, 3) uint8, as evaluation decodes a stored image.

    ``value`` is encoded image bytes (PNG, JPEG, ...; also as base64 text) or a uint8 array (H, W), (H, W, 3) or (3, H, W); anything
    else raises ``BadInput`` naming ``row``.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = _unwrap_base64(bytes(value))
        if not data:
            raise BadInput(f"row {row}: empty image bytes")
        try:
            with Image.open(io.BytesIO(data)) as opened:
                width, height = opened.size
        except Exception as error:  # noqa: BLE001 - PIL raises several types on bytes that are no image
            raise BadInput(f"row {row}: not a decodable image ({type(error).__name__}: {error})") from None
        if max(width, height) > MAX_SIDE:
            raise BadInput(f"row {row}: image of {width}x{height} pixels exceeds {MAX_SIDE} per side")
        try:
            return decode_rgb(data, image_size)
        except Exception as error:  # noqa: BLE001 - truncated or damaged image data
            raise BadInput(f"row {row}: not a decodable image ({type(error).__name__}: {error})") from None
    if isinstance(value, str):
        raise BadInput(f"row {row}: got a string; send image bytes (base64 in JSON for a binary column)")
    if isinstance(value, (np.ndarray, list, tuple, Tensor)):
        array = _array_to_hwc(value.numpy() if isinstance(value, Tensor) else value, row)
        image = Image.fromarray(array, mode="RGB")
        return np.asarray(_resize_center_crop(image, image_size), dtype=np.uint8)
    raise BadInput(f"row {row}: an image must be encoded bytes or a uint8 array, got {type(value).__name__}")


def images_from_values(values: Sequence[Any], image_size: int) -> Tensor:
    """Request values -> uint8 batch (N, 3, image_size, image_size); ``BadInput`` on an empty batch."""
    if len(values) == 0:
        raise BadInput("empty batch: send at least one image")
    arrays = [decode_value(value, image_size, row) for row, value in enumerate(values)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def image_column(model_input: Any) -> list[Any]:
    """The ``image`` values of a pyfunc input: a DataFrame or mapping with an ``image`` column, or a list of
    images / of ``{"image": ...}`` records."""
    if hasattr(model_input, "columns"):  # a pandas DataFrame, without importing pandas
        if "image" not in model_input.columns:
            raise BadInput(f"the input needs a column 'image'; got columns {list(model_input.columns)}")
        return list(model_input["image"])
    if isinstance(model_input, Mapping):
        if "image" not in model_input:
            raise BadInput(f"the input needs a key 'image'; got keys {sorted(model_input)}")
        values = model_input["image"]
        return list(values) if isinstance(values, (list, tuple)) else [values]
    if isinstance(model_input, (list, tuple)):
        return [value["image"] if isinstance(value, Mapping) and "image" in value else value for value in model_input]
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        return list(model_input)
    raise BadInput(f"unsupported input type {type(model_input).__name__}: send a column 'image'")


# ------------------------------------------------------------------------------------------------- prediction


class Predictor:
    """A served model in memory: ``predict`` maps request values to one output record per image.

    Classifier: ``{"label": name, "label_index": i, "probability": p_i, "probabilities": [p per class]}`` with
    ``p = softmax(logits)`` and ``i = argmax``. Encoder: ``{"embedding": f / ||f||_2}``.
    """

    def __init__(self, module: nn.Module, spec: ServingSpec, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.spec = spec
        self._normalize = spec.normalization()

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> Predictor:
        module, spec = load_served_module(directory)
        return cls(module, spec, device)

    @torch.no_grad()
    def forward_images(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, S, S) -> logits (classifier) or L2-normalised features (encoder), float32 on the CPU."""
        batch = self._normalize(images.to(self.device).float().div_(255.0))
        outputs = self.module(batch).float()
        if self.spec.kind == "encoder":
            outputs = F.normalize(outputs.flatten(1), dim=1)
        return outputs.cpu()

    def records(self, outputs: Tensor) -> list[dict[str, Any]]:
        if self.spec.kind == "encoder":
            return [{"embedding": row.tolist()} for row in outputs]
        probabilities = outputs.softmax(dim=1)
        best = probabilities.argmax(dim=1)
        return [{"label": self.spec.class_names[int(index)], "label_index": int(index),
                 "probability": float(row[index]), "probabilities": row.tolist()}
                for row, index in zip(probabilities, best)]

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One record per image of ``model_input`` (see ``image_column``); ``BadInput`` on a bad request."""
        images = images_from_values(image_column(model_input), self.spec.image_size)
        return self.records(self.forward_images(images))


def _load_pyfunc(path: str) -> Predictor:
    """MLflow ``python_function`` entry point (``loader_module="ssl_core.serving"``): ``path`` is the model's data
    folder."""
    return Predictor.load(path)
