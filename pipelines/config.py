"""The one typed pipeline config: YAML -> frozen dataclasses, validated before anything starts.

Every section is a dataclass whose bounded fields declare their valid range (``ssl_core.hparams``). Errors name
the key path (``pretrain.lr``, ``method.config.temperature``) and what is allowed. Relative paths are resolved
against the working directory at load time, so Ray workers in other directories see absolute paths.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssl_core.backbones import BACKBONES
from ssl_core.hparams import bounded, config_from_dict
from ssl_core.methods import METHODS, method_config

CONFIG_DIR = Path(__file__).parent / "configs"
QUICKSTART = CONFIG_DIR / "quickstart.yaml"
STORAGE_PATH_ENV = "SSLFLOW_STORAGE_PATH"


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow store. ``uri`` None -> $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db + <cwd>/mlartifacts."""

    uri: str | None = None
    artifact_location: str | None = None
    experiment: str = "sslflow"


@dataclass(frozen=True)
class DataConfig:
    """Where the Parquet dataset comes from (``source``) and lives (``path``), and the training image size."""

    source: str = "builtin:digits"
    path: str = "data/digits"
    image_size: int = bounded(32, 8, 1024)
    val_fraction: float = bounded(0.1, 0.0, 0.5)
    seed: int = 0


@dataclass(frozen=True)
class MethodSection:
    name: str = "simclr"
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScalingSection:
    """Ray Train workers. On small CPU machines keep ``cpus_per_worker`` below 1 so Ray Data readers get a CPU.

    ``storage_path`` (Ray Train checkpoints): the config's value, else ``$SSLFLOW_STORAGE_PATH``, else
    ``sslflow_runs``; a local path is made absolute, a URI (``s3://``, ``gs://``) is kept as it is.
    """

    num_workers: int = bounded(1, 0, 4096)
    use_gpu: bool = False
    cpus_per_worker: float = bounded(1.0, 0.1, 256)
    gpus_per_worker: float = bounded(1.0, 0.0, 16)
    storage_path: str = "sslflow_runs"
    max_failures: int = bounded(1, 0, 100)
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker also requests (e.g. ``{accelerator_type:A10G: 0.01}`` or a per-node slot)."""


@dataclass(frozen=True)
class PretrainSection:
    epochs: int = bounded(100, 1, 100000)
    batch_size: int = bounded(256, 2, 65536)
    optimizer: str = bounded("lars", choices=("lars", "adamw", "sgd"))
    lr: float = bounded(0.3, 0.0, 100.0)
    lr_scaling: str = bounded("linear", choices=("linear", "sqrt", "none"))
    weight_decay: float = bounded(1e-6, 0.0, 1.0)
    warmup_epochs: float = bounded(10.0, 0.0, 1000.0)
    final_lr_fraction: float = bounded(0.0, 0.0, 1.0)
    grad_clip: float | None = None
    checkpoint_every: int = bounded(1, 1, 100000)
    knn_every: int = bounded(1, 1, 100000)
    knn_k: int = bounded(20, 1, 1000)
    knn_temperature: float = bounded(0.07, 0.001, 10.0)
    knn_bank_size: int = bounded(10000, 10, 10_000_000)
    log_every_steps: int = bounded(10, 1, 100000)
    compile: bool = False
    seed: int = 0
    inject_failure_at_epoch: int | None = None
    inject_nan_at_step: int | None = None


@dataclass(frozen=True)
class TuneSection:
    """The optional Ray Tune search before ``pretrain`` (on with ``enabled``); its best overlay feeds pretrain.

    ``space`` names a module with ``METRIC``, ``MODE`` and ``space(train_rows)`` (default ``tune_spaces.<method>``);
    ``bounds`` overrides or adds dimensions, e.g. ``{temperature: {loguniform: [0.05, 0.5]}}``. Each trial
    pretrains for ``epochs`` on ``num_workers`` x ``cpus_per_worker`` (+ ``gpus_per_worker``) and reports the
    metric per epoch; ``scheduler: asha`` stops the worst early. ``max_concurrent_trials: 0`` packs as many
    trials as the cluster's CPUs and GPUs hold.
    """

    enabled: bool = False
    space: str | None = None
    bounds: dict[str, Any] = field(default_factory=dict)
    search_lr: bool = False
    search_weight_decay: bool = False
    searcher: str = bounded("random", choices=("random", "optuna"))
    scheduler: str = bounded("asha", choices=("asha", "none"))
    num_samples: int = bounded(8, 1, 100000)
    max_concurrent_trials: int = bounded(0, 0, 100000)
    epochs: int = bounded(3, 1, 100000)
    grace_period: int = bounded(1, 1, 100000)
    reduction_factor: float = bounded(2.0, 1.01, 100.0)
    num_workers: int = bounded(1, 1, 4096)
    cpus_per_worker: float = bounded(1.0, 0.05, 256)
    gpus_per_worker: float = bounded(0.0, 0.0, 16)
    seed: int = 0
    inject_failure_trial: int | None = None


@dataclass(frozen=True)
class EvaluateSection:
    knn_k: int = bounded(20, 1, 1000)
    knn_temperature: float = bounded(0.07, 0.001, 10.0)
    linear_probe_epochs: int = bounded(100, 1, 10000)
    linear_probe_lr: float = bounded(0.01, 0.0, 10.0)


@dataclass(frozen=True)
class FinetuneSection:
    label_fraction: float = bounded(0.1, 0.0001, 1.0)
    epochs: int = bounded(30, 1, 10000)
    batch_size: int = bounded(128, 2, 65536)
    lr: float = bounded(0.01, 0.0, 100.0)
    weight_decay: float = bounded(0.0, 0.0, 1.0)
    head_layers: int = bounded(1, 0, 4)


@dataclass(frozen=True)
class DistillSection:
    student_backbone: str = "resnet18"
    epochs: int = bounded(30, 1, 10000)
    batch_size: int = bounded(128, 2, 65536)
    lr: float = bounded(0.01, 0.0, 100.0)
    weight_decay: float = bounded(0.0, 0.0, 1.0)
    temperature: float = bounded(1.0, 0.01, 100.0)
    labeled_loss_weight: float = bounded(0.0, 0.0, 1.0)


@dataclass(frozen=True)
class RegistrySection:
    model_name: str = "sslflow-student"
    promote_margin: float = bounded(0.0, 0.0, 1.0)


SECTIONS: dict[str, type] = {
    "tracking": TrackingConfig,
    "data": DataConfig,
    "method": MethodSection,
    "scaling": ScalingSection,
    "tune": TuneSection,
    "pretrain": PretrainSection,
    "evaluate": EvaluateSection,
    "finetune": FinetuneSection,
    "distill": DistillSection,
    "registry": RegistrySection,
}


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    tracking: TrackingConfig
    data: DataConfig
    method: MethodSection
    scaling: ScalingSection
    tune: TuneSection
    pretrain: PretrainSection
    evaluate: EvaluateSection
    finetune: FinetuneSection
    distill: DistillSection
    registry: RegistrySection

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _resolve_path(path: str, base: Path) -> str:
    if "://" in path:
        return path
    return str((base / path).resolve())


def resolve_tracking(tracking: TrackingConfig, base: Path) -> TrackingConfig:
    """Fill the MLflow URI and artifact location: explicit config > $MLFLOW_TRACKING_URI > local SQLite."""
    uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(base / 'mlflow.db').resolve()}"
    artifact_location = tracking.artifact_location
    if artifact_location is None and uri.startswith("sqlite:"):
        artifact_location = str((base / "mlartifacts").resolve())
    if uri.startswith(("http://", "https://")) and artifact_location is not None and "://" not in artifact_location:
        raise ValueError(
            f"tracking.artifact_location={artifact_location!r} is a local path but tracking.uri={uri!r} is a server: "
            "leave artifact_location unset (the server's artifact store is used) or give an object storage URI"
        )
    return dataclasses.replace(tracking, uri=uri, artifact_location=artifact_location)


def config_from_mapping(values: Mapping[str, Any], base: Path | None = None) -> PipelineConfig:
    """Validate a nested mapping into a ``PipelineConfig``; raise ``ValueError`` naming the bad key path."""
    base = base or Path.cwd()
    if not isinstance(values, Mapping):
        raise ValueError(f"the config must be a mapping of sections, got {type(values).__name__}")
    unknown = sorted(set(values) - set(SECTIONS) - {"name"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; allowed: name, {', '.join(SECTIONS)}")
    sections: dict[str, Any] = {}
    for key, cls in SECTIONS.items():
        raw = values.get(key) or {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"{key} must be a mapping, got {type(raw).__name__}")
        try:
            sections[key] = config_from_dict(cls, raw, path=key)
        except TypeError as error:
            raise ValueError(f"{key}: {error}") from None
    method: MethodSection = sections["method"]
    if method.name not in METHODS:
        raise ValueError(f"method.name={method.name!r} is unknown; known: {', '.join(METHODS.names())}")
    resolved_method = method_config(method.name, method.config, path="method.config")
    if resolved_method.backbone not in BACKBONES:
        raise ValueError(f"method.config.backbone={resolved_method.backbone!r} is unknown; known: {', '.join(BACKBONES.names())}")
    if sections["distill"].student_backbone not in BACKBONES:
        raise ValueError(
            f"distill.student_backbone={sections['distill'].student_backbone!r} is unknown; "
            f"known: {', '.join(BACKBONES.names())}"
        )
    head_layers = sections["finetune"].head_layers
    available = getattr(resolved_method, "projection_layers", None)
    if head_layers > 0 and not hasattr(resolved_method, "projection_dim"):
        raise ValueError(
            f"finetune.head_layers={head_layers} needs a projection head, but method {method.name!r} has none; "
            "set finetune.head_layers to 0"
        )
    if available is not None and head_layers > available:
        raise ValueError(f"finetune.head_layers={head_layers} exceeds method.config.projection_layers={available}")
    method_values = dataclasses.asdict(resolved_method)
    method_values["image_size"] = sections["data"].image_size
    sections["method"] = MethodSection(method.name, method_config(method.name, method_values, "method.config").__dict__)
    sections["data"] = dataclasses.replace(sections["data"], path=_resolve_path(sections["data"].path, base))
    for resource, amount in sections["scaling"].resources_per_worker.items():
        if resource in ("CPU", "GPU") or not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0:
            raise ValueError(
                f"scaling.resources_per_worker.{resource}={amount!r}: give custom resources as non-negative numbers "
                "(CPU and GPU come from cpus_per_worker / gpus_per_worker)"
            )
    storage_path = sections["scaling"].storage_path
    if "storage_path" not in (values.get("scaling") or {}) and os.environ.get(STORAGE_PATH_ENV):
        storage_path = os.environ[STORAGE_PATH_ENV]  # a cluster's shared checkpoint store (e.g. s3://bucket/runs)
    sections["scaling"] = dataclasses.replace(sections["scaling"], storage_path=_resolve_path(storage_path, base))
    sections["tracking"] = resolve_tracking(sections["tracking"], base)
    name = values.get("name", "sslflow")
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")
    config = PipelineConfig(name=name, **sections)
    if config.tune.enabled:
        from pipelines.stages.tune import check_tune_section

        check_tune_section(config)
    return config


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Read YAML at ``path`` (quickstart when None), deep-merge ``overrides``, validate."""
    path = Path(path) if path is not None else QUICKSTART
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if overrides:
        values = deep_merge(values, overrides)
    try:
        return config_from_mapping(values)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` merged in, recursively for nested mappings."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
