"""The served models the register stage logs, and how the pipeline reads them back.

``log_served_model`` writes a module with its ``ssl_core.serving.ServingSpec`` (``save_served_model``) and logs the
folder as an MLflow ``python_function`` model whose loader is ``ssl_core.serving`` and whose ``code_paths`` ship
the ``ssl_core`` package, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` need neither ``pipelines``
nor an install of sslflow. The model's signature: input one column ``image`` (binary: PNG/JPEG bytes, base64 in
JSON requests); output, for a classifier, ``label`` / ``label_index`` / ``probability`` / ``probabilities``, for an
encoder ``embedding`` (L2-normalised). Its pip requirements pin the training environment's versions.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

import ssl_core
from pipelines import tracking
from pipelines.config import TrackingConfig
from ssl_core.data import encode_png
from ssl_core.serving import Predictor, ServingSpec, load_served_module, save_served_model

LOADER_MODULE = "ssl_core.serving"
DATA_FOLDER = "served"
"""Name of the served-model folder inside the MLflow model's ``data`` folder."""
PINNED_DISTRIBUTIONS = ("torch", "torchvision", "numpy", "pillow", "mlflow")


def signature(kind: str) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec("binary", "image")])
    if kind == "encoder":
        outputs = Schema([ColSpec(Array("double"), "embedding")])
    else:
        outputs = Schema([ColSpec("string", "label"), ColSpec("long", "label_index"),
                          ColSpec("double", "probability"), ColSpec(Array("double"), "probabilities")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pinned_requirements() -> list[str]:
    """``name==version`` of the packages a served model imports, as installed where it was trained."""
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in PINNED_DISTRIBUTIONS]


def example_images(image_size: int, count: int = 2) -> list[bytes]:
    """``count`` seeded random PNG images of ``image_size`` pixels: the logged input example."""
    generator = np.random.default_rng(0)
    return [encode_png(generator.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
            for _ in range(count)]


def log_served_model(tracking_config: TrackingConfig, run_id: str, name: str, module: nn.Module,
                     spec: ServingSpec) -> str:
    """Log ``module`` as the ``python_function`` model ``name`` of ``run_id``; returns its model URI."""
    with tempfile.TemporaryDirectory() as directory:
        folder = save_served_model(Path(directory) / DATA_FOLDER, module, spec)
        code = Path(directory) / "code" / "ssl_core"  # the package's sources, without compiled caches
        shutil.copytree(Path(ssl_core.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        example = pd.DataFrame({"image": example_images(spec.image_size)})
        return tracking.log_pyfunc_model(
            tracking_config, run_id, name, loader_module=LOADER_MODULE, data_path=folder,
            code_paths=[str(code)], signature=signature(spec.kind),
            input_example=example, pip_requirements=pinned_requirements(),
            metadata={"sslflow.kind": spec.kind, "sslflow.image_size": spec.image_size,
                      "sslflow.class_names": list(spec.class_names)},
        )


def served_folder(tracking_config: TrackingConfig, model_uri: str, destination: str | Path) -> Path:
    """Download the served-model folder (``serving.json`` + ``weights.pt``) of ``model_uri`` into ``destination``."""
    from mlflow.models import Model

    local = tracking.download_artifact(tracking_config, model_uri, destination)
    flavor = Model.load(str(local)).flavors.get("python_function", {})
    if flavor.get("loader_module") != LOADER_MODULE:
        raise ValueError(f"{model_uri} is not an sslflow served model (python_function loader "
                         f"{flavor.get('loader_module')!r}, expected {LOADER_MODULE!r})")
    return local / flavor["data"]


def load_predictor(tracking_config: TrackingConfig, model_uri: str, device: str | torch.device = "cpu") -> Predictor:
    with tempfile.TemporaryDirectory() as directory:
        return Predictor.load(served_folder(tracking_config, model_uri, directory), device)


def load_served_torch_module(tracking_config: TrackingConfig, model_uri: str) -> tuple[nn.Module, ServingSpec]:
    """The torch module of a served model (eval mode, CPU) and its spec: what evaluation needs."""
    with tempfile.TemporaryDirectory() as directory:
        return load_served_module(served_folder(tracking_config, model_uri, directory))


def load_torch_module(tracking_config: TrackingConfig, model_uri: str) -> nn.Module:
    """The torch module behind ``model_uri``, whichever way it was logged: a training run's PyTorch model
    (``tracking.load_torch_model``) or a registered served model (its rebuilt module). For evaluation."""
    from mlflow.models import get_model_info

    tracking.client_for(tracking_config)
    if "pytorch" in get_model_info(model_uri).flavors:
        return tracking.load_torch_model(tracking_config, model_uri)
    module, _ = load_served_torch_module(tracking_config, model_uri)
    return module
