"""The one typed pipeline config: YAML -> frozen dataclasses, parsed, resolved and validated once, at load.

Every section is a frozen dataclass whose bounded fields declare their valid range and which checks itself when
built (``ssl_core.hparams.Validated``); the method's config stays its typed ``Config``. Errors name the key path
(``pretrain.lr``, ``method.config.temperature``) and what is allowed. Loading also resolves what depends on
where it runs: relative paths against the working directory, ``$SSLFLOW_STORAGE_PATH``, the tracking URI.

Across a process boundary the config travels as ``to_dict()`` and is rebuilt once with ``from_dict`` (types
only: nothing is re-resolved). ``with_overlay`` applies a Ray Tune overlay as a typed, re-validated replace.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ssl_core.backbones import BACKBONES
from ssl_core.hparams import FieldValueError, Validated, bounded, config_from_dict, replace_config
from ssl_core.methods import METHODS, MethodConfig, check_finetune_head_layers, method_config
from ssl_core.recipes import recipe
from ssl_core.semi.config import SemiConfig

CONFIG_DIR = Path(__file__).parent / "configs"
QUICKSTART = CONFIG_DIR / "quickstart.yaml"
STORAGE_PATH_ENV = "SSLFLOW_STORAGE_PATH"

T = TypeVar("T")


@dataclass(frozen=True)
class TrackingConfig(Validated):
    """MLflow store. ``uri`` None -> $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db + <cwd>/mlartifacts."""

    uri: str | None = None
    artifact_location: str | None = None
    experiment: str = "sslflow"


@dataclass(frozen=True)
class DataConfig(Validated):
    """Where the Parquet dataset comes from (``source``) and lives (``path``: a local folder, or ``s3://`` /
    ``gs://`` URI read by every node with its own credentials, see ``pipelines.storage``), and the training image size.
    ``npz_keys`` names the arrays of an ``.npz`` source by role (``{x: train_images, y_test: labels_test}``; roles
    ``x``, ``y``, ``x_test``, ``y_test``) when they are not among the common names ``ssl_core.sources`` knows."""

    source: str = "builtin:digits"
    path: str = "data/digits"
    image_size: int = bounded(32, 8, 1024)
    val_fraction: float = bounded(0.1, 0.0, 0.5)
    seed: int = 0
    npz_keys: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        from pipelines.storage import check_uri, is_uri
        from ssl_core.sources import NPZ_KEY_NAMES

        if is_uri(self.path):
            try:
                check_uri(self.path)  # parses only: whether the bucket is reachable is checked when a stage reads it
            except ValueError as error:
                raise FieldValueError("path", self.path, f"is not usable: {error}") from None
        for role, name in self.npz_keys.items():
            if role not in NPZ_KEY_NAMES or not isinstance(name, str) or not name:
                raise FieldValueError(f"npz_keys.{role}", name, f"is not allowed: roles {', '.join(NPZ_KEY_NAMES)}, "
                                      "each naming an array of the .npz")


@dataclass(frozen=True)
class MethodSection:
    """The method's registered name and its typed, validated ``Config``."""

    name: str = "simclr"
    config: MethodConfig = field(default_factory=MethodConfig)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MethodSection:
        return cls(values["name"], METHODS.get(values["name"]).Config(**values["config"]))


@dataclass(frozen=True)
class ScalingSection(Validated):
    """Ray Train workers. Each CPU worker runs ``worker_threads(cpus_per_worker, torch_threads)`` torch intra-op
    threads (``pipelines.train_loop``): ``torch_threads`` when set, else ``max(1, floor(cpus_per_worker))``, so a
    worker never computes on more cores than Ray reserved for it and the rest of the node stays with the Ray Data
    readers (measured in ``benchmarks/threads.py``; the README's "Threads per worker" gives the table).

    ``storage_path`` (Ray Train checkpoints): the config's value, else ``$SSLFLOW_STORAGE_PATH``, else
    ``sslflow_runs``; a local path is made absolute, a URI (``s3://``, ``gs://``) is kept as it is.
    """

    num_workers: int = bounded(1, 0, 4096)
    use_gpu: bool = False
    cpus_per_worker: float = bounded(1.0, 0.1, 256)
    gpus_per_worker: float = bounded(1.0, 0.0, 16)
    storage_path: str = "sslflow_runs"
    max_failures: int = bounded(1, 0, 100)
    torch_threads: int = bounded(0, 0, 1024)
    """Torch intra-op threads per CPU worker; 0: ``max(1, floor(cpus_per_worker))``."""
    retain_freed_memory: bool = True
    """CPU workers keep the memory they free for the next step instead of handing it back to the kernel
    (``pipelines.host_memory``: faster steps, a higher peak resident size); false: glibc's defaults."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker also requests (e.g. ``{accelerator_type:A10G: 0.01}`` or a per-node slot)."""
    resource_wait_s: float = bounded(600.0, 1.0, 86400.0)
    """On a cluster, how long a training stage waits for its workers' CPUs/GPUs (an autoscaler adding nodes) before
    it fails naming the keys (``pipelines.ray_train.fit``); the embedded local Ray refuses at load what this machine
    cannot hold (``machine_shortfall``)."""

    def check(self) -> None:
        for resource, amount in self.resources_per_worker.items():
            if resource in ("CPU", "GPU") or not isinstance(amount, (int, float)) or isinstance(amount, bool) \
                    or amount < 0:
                raise FieldValueError(f"resources_per_worker.{resource}", amount,
                                      "is not allowed: give custom resources as non-negative numbers "
                                      "(CPU and GPU come from cpus_per_worker / gpus_per_worker)")


@dataclass(frozen=True)
class PretrainSection(Validated):
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
    budget_minutes: float | None = None
    """Wall-clock budget of the training loop (``ssl_core.budget.EpochBudget``): the schedules span the epochs that
    fit (re-projected after each epoch from the measured pace, ``epochs`` the cap, the warm-up keeping its share
    ``warmup_epochs / epochs``) and the stage stops at the end of the epoch that would otherwise cross it."""
    precision: str = bounded("auto", choices=("auto", "fp32", "bf16"))
    """Autocast of the training step (``ssl_core.device.autocast``): ``auto`` is bf16 on a GPU, fp32 on a CPU."""

    def check(self) -> None:
        if self.budget_minutes is not None and (isinstance(self.budget_minutes, bool) or not isinstance(
                self.budget_minutes, (int, float)) or not 0 < self.budget_minutes <= 1e6):
            raise FieldValueError("budget_minutes", self.budget_minutes, "must be a number of minutes in (0, 1e6] "
                                  "or null (no budget: run pretrain.epochs)")
        # Refused, not clamped: a warmup longer than the run means the schedule the user wrote never happens.
        if self.warmup_epochs > self.epochs:
            raise FieldValueError("warmup_epochs", self.warmup_epochs,
                                  f"exceeds pretrain.epochs={self.epochs}: the learning-rate warmup must end "
                                  "within the run (set warmup_epochs <= epochs)")


@dataclass(frozen=True)
class TuneSection(Validated):
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
    trial_budget_minutes: float | None = None
    """Each pretraining trial's wall-clock budget (the trial's ``pretrain.budget_minutes``; ``epochs`` stays the
    cap); null: a trial runs ``epochs``. Not inherited from ``pretrain.budget_minutes`` (that one sizes the final
    run)."""
    finetune: bool = False
    """Also search fine-tuning, after pretrain (independent of ``enabled``, the pretrain search): trials fine-tune
    the pretrain checkpoint on ``finetune.label_fraction`` for ``epochs`` and report ``val_top1`` (the labeled val
    split) each epoch (``pipelines.finetuning``); the space is ``tune_spaces.semi_finetune``'s for
    ``finetune.semi.algorithm``, plus ``finetune.lr`` / ``weight_decay`` with ``search_lr`` /
    ``search_weight_decay`` (``bounds`` apply to the pretrain search only). The best overlay feeds finetune."""

    def check(self) -> None:
        if self.trial_budget_minutes is not None and (isinstance(self.trial_budget_minutes, bool) or not isinstance(
                self.trial_budget_minutes, (int, float)) or not 0 < self.trial_budget_minutes <= 1e6):
            raise FieldValueError("trial_budget_minutes", self.trial_budget_minutes,
                                  "must be a number of minutes in (0, 1e6] or null (trials run tune.epochs)")
        if (self.enabled or self.finetune) and self.scheduler == "asha" and self.grace_period > self.epochs:
            raise FieldValueError("grace_period", self.grace_period, f"exceeds tune.epochs={self.epochs}")


@dataclass(frozen=True)
class EvaluateSection(Validated):
    knn_k: int = bounded(20, 1, 1000)
    knn_temperature: float = bounded(0.07, 0.001, 10.0)
    linear_probe_epochs: int = bounded(100, 1, 10000)
    linear_probe_lr: float = bounded(0.01, 0.0, 10.0)


@dataclass(frozen=True)
class FinetuneSection(Validated):
    """Fine-tuning on labeled fractions of the train split. ``label_fractions`` (e.g. ``[0.01, 0.1, 1.0]``) runs one
    nested MLflow run per fraction; empty means ``[label_fraction]``. ``label_fraction`` names the fraction whose
    teacher is the stage's record (``test_top1``, ``model_uri``: what register registers) and must be one of them.
    ``semi`` adds unlabeled rows (``ssl_core.semi.SemiConfig``; ``algorithm: none`` trains on the labeled rows only).
    """

    label_fraction: float = bounded(0.1, 0.0001, 1.0)
    label_fractions: tuple[float, ...] = ()
    epochs: int = bounded(30, 1, 10000)
    batch_size: int = bounded(128, 2, 65536)
    lr: float = bounded(0.01, 0.0, 100.0)
    weight_decay: float = bounded(0.0, 0.0, 1.0)
    head_layers: int = bounded(1, 0, 4)
    semi: SemiConfig = field(default_factory=SemiConfig)

    @property
    def fractions(self) -> tuple[float, ...]:
        """The labeled fractions fine-tuned, in the configured order."""
        return self.label_fractions or (self.label_fraction,)

    def check(self) -> None:
        for fraction in self.label_fractions:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0001 <= fraction <= 1.0:
                raise FieldValueError("label_fractions", list(self.label_fractions),
                                      "must hold numbers in [0.0001, 1.0]")
        if len(set(self.label_fractions)) != len(self.label_fractions):
            raise FieldValueError("label_fractions", list(self.label_fractions), "holds a fraction twice")
        if self.label_fractions and self.label_fraction not in self.label_fractions:
            raise FieldValueError("label_fraction", self.label_fraction,
                                  f"is not one of finetune.label_fractions={list(self.label_fractions)} (it names "
                                  "the fraction whose teacher the stage records)")


@dataclass(frozen=True)
class DistillSection(Validated):
    student_backbone: str = "resnet18"
    epochs: int = bounded(30, 1, 10000)
    batch_size: int = bounded(128, 2, 65536)
    lr: float = bounded(0.01, 0.0, 100.0)
    weight_decay: float = bounded(0.0, 0.0, 1.0)
    temperature: float = bounded(1.0, 0.01, 100.0)
    labeled_loss_weight: float = bounded(0.0, 0.0, 1.0)
    teacher_fraction: float | None = None
    """The labeled fraction whose fine-tuned teacher is distilled (one of ``finetune.fractions``); None: the
    fine-tune stage's ``label_fraction``."""

    def check(self) -> None:
        if self.teacher_fraction is not None and (isinstance(self.teacher_fraction, bool) or not isinstance(
                self.teacher_fraction, (int, float))):
            raise FieldValueError("teacher_fraction", self.teacher_fraction, "must be a number or null")
        if self.student_backbone not in BACKBONES:
            raise FieldValueError("student_backbone", self.student_backbone,
                                  f"is unknown; known: {', '.join(BACKBONES.names())}")


@dataclass(frozen=True)
class RegistrySection(Validated):
    model_name: str = "sslflow-student"
    promote_margin: float = bounded(0.0, 0.0, 1.0)


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
        """Plain nested values (the method's config as a mapping): MLflow params, fingerprints, Ray boundaries."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PipelineConfig:
        """Rebuild a config from ``to_dict()`` (nothing is re-resolved)."""
        return from_dict(cls, values)

    @property
    def teacher_fraction(self) -> float:
        """The labeled fraction whose fine-tuned teacher is distilled and registered: ``distill.teacher_fraction``,
        else ``finetune.label_fraction``."""
        fraction = self.distill.teacher_fraction
        return self.finetune.label_fraction if fraction is None else fraction

    def with_overlay(self, overlay: Mapping[str, Mapping[str, Any]]) -> PipelineConfig:
        """A copy with ``{section: {field: value}}`` replaced (``{"method": {"config": {...}}}`` for the method's
        fields), each changed section re-validated; errors name ``section.field``."""
        changes: dict[str, Any] = {}
        for section, values in overlay.items():
            if section not in SECTIONS:
                raise ValueError(f"unknown key {section!r} in an overlay; allowed: {', '.join(SECTIONS)}")
            current = getattr(self, section)
            if section == "method":
                unknown = set(values) - {"config"}
                if unknown:
                    raise ValueError(f"an overlay may change method.config only, not method.{sorted(unknown)[0]}")
                changes[section] = dataclasses.replace(
                    current, config=replace_config(current.config, values.get("config", {}), "method.config"))
            elif section == "finetune" and isinstance(values.get("semi"), Mapping):
                semi = replace_config(current.semi, values["semi"], "finetune.semi")
                changes[section] = replace_config(current, {**values, "semi": semi}, section)
            else:
                changes[section] = replace_config(current, values, section)
        return dataclasses.replace(self, **changes)


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


def from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """Rebuild the frozen dataclass ``cls`` from its ``dataclasses.asdict`` form: fields typed as dataclasses are
    rebuilt recursively (through their own ``from_dict`` when they have one, as ``MethodSection`` does)."""
    hints = typing.get_type_hints(cls)
    rebuilt: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value, hint = values[f.name], hints[f.name]
        if hasattr(hint, "from_dict"):
            value = hint.from_dict(value)
        elif dataclasses.is_dataclass(hint):
            value = from_dict(hint, value)
        rebuilt[f.name] = value
    return cls(**rebuilt)


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


def _method_section(raw: Mapping[str, Any], image_size: int) -> MethodSection:
    """The method's name and typed Config; its ``image_size`` is the data's."""
    name = raw.get("name", MethodSection.name)
    unknown = sorted(set(raw) - {"name", "config"})
    if unknown:
        raise ValueError(f"unknown key method.{unknown[0]}; allowed: name, config")
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} is unknown; known: {', '.join(METHODS.names())}")
    values = raw.get("config") or {}
    if not isinstance(values, Mapping):
        raise ValueError(f"method.config must be a mapping, got {type(values).__name__}")
    return MethodSection(name, method_config(name, {**values, "image_size": image_size}, "method.config"))


def _with_recipe(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The raw ``method`` and ``pretrain`` sections with the recipe of the method at ``data.image_size``
    (``ssl_core.recipes``) filling what they leave out: the stem (``small_images``) always, the rest of the backbone
    group only when ``method.config`` names no backbone, each objective field unless set, the optimizer group only
    when ``pretrain`` sets none of optimizer, lr, lr_scaling, weight_decay. An unknown method or a malformed section
    is left for the checks that name it."""
    method, pretrain = raw["method"], raw["pretrain"]
    name = method.get("name", MethodSection.name)
    config = method.get("config") or {}
    image_size = raw["data"].get("image_size", DataConfig.image_size)
    if name not in METHODS or not isinstance(config, Mapping) or isinstance(image_size, bool) \
            or not isinstance(image_size, int):
        return {}
    fields = {f.name: f.default for f in dataclasses.fields(METHODS.get(name).Config)}
    chosen = recipe(name, image_size, default_backbone=fields["backbone"])
    stem = {"small_images": chosen.backbone["small_images"]}  # the stem follows the image size whatever the backbone
    filled = {**stem, **config} if "backbone" in config else {**chosen.backbone, **config}
    filled = {**{k: v for k, v in chosen.objective.items() if k in fields}, **filled}
    filled = {k: v for k, v in filled.items() if k in fields or k in config}
    sections: dict[str, Mapping[str, Any]] = {"method": {**method, "config": filled}}
    if not set(chosen.optimizer) & set(pretrain):
        sections["pretrain"] = {**chosen.optimizer, **pretrain}
    return sections


def _with_semi_config(finetune: Mapping[str, Any]) -> Mapping[str, Any]:
    """The raw finetune section with its ``semi`` mapping built into a ``SemiConfig`` (errors name
    ``finetune.semi.<key>``)."""
    if "semi" not in finetune:
        return finetune
    semi = finetune["semi"] or {}
    if not isinstance(semi, Mapping):
        raise ValueError(f"finetune.semi must be a mapping, got {type(semi).__name__}")
    return {**finetune, "semi": config_from_dict(SemiConfig, semi, path="finetune.semi")}


def config_from_mapping(values: Mapping[str, Any], base: Path | None = None) -> PipelineConfig:
    """Validate a nested mapping into a ``PipelineConfig``; raise ``ValueError`` naming the bad key path.
    Relative paths are resolved against ``base`` (default: the working directory)."""
    base = base or Path.cwd()
    if not isinstance(values, Mapping):
        raise ValueError(f"the config must be a mapping of sections, got {type(values).__name__}")
    unknown = sorted(set(values) - set(SECTIONS) - {"name"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; allowed: name, {', '.join(SECTIONS)}")
    raw = {key: values.get(key) or {} for key in SECTIONS}
    for key, section in raw.items():
        if not isinstance(section, Mapping):
            raise ValueError(f"{key} must be a mapping, got {type(section).__name__}")
    raw["finetune"] = _with_semi_config(raw["finetune"])
    raw.update(_with_recipe(raw))
    sections: dict[str, Any] = {}
    for key, cls in SECTIONS.items():
        if key != "method":
            try:
                sections[key] = config_from_dict(cls, raw[key], path=key)
            except TypeError as error:
                raise ValueError(f"{key}: {error}") from None
    sections["method"] = _method_section(raw["method"], sections["data"].image_size)
    try:
        check_finetune_head_layers(sections["method"].name, sections["method"].config, sections["finetune"].head_layers)
    except FieldValueError as error:
        raise error.at("finetune") from None
    teacher_fraction = sections["distill"].teacher_fraction
    if teacher_fraction is not None and teacher_fraction not in sections["finetune"].fractions:
        raise ValueError(f"distill.teacher_fraction={teacher_fraction!r} is not one of the fine-tuned fractions "
                         f"{list(sections['finetune'].fractions)}")
    sections["data"] = dataclasses.replace(sections["data"], path=_resolve_path(sections["data"].path, base))
    _check_source(sections["data"].source, base)
    storage_path = sections["scaling"].storage_path
    if "storage_path" not in raw["scaling"] and os.environ.get(STORAGE_PATH_ENV):
        storage_path = os.environ[STORAGE_PATH_ENV]  # a cluster's shared checkpoint store (e.g. s3://bucket/runs)
    sections["scaling"] = dataclasses.replace(sections["scaling"], storage_path=_resolve_path(storage_path, base))
    sections["tracking"] = resolve_tracking(sections["tracking"], base)
    name = values.get("name", "sslflow")
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")
    config = PipelineConfig(name=name, **sections)
    check_first_step(config)
    if config.tune.enabled:
        _check_tune_trial(config)
        _check_search(config)
    if config.tune.finetune:
        finetune_search_space(config)
    return config


def _check_source(source: str, base: Path) -> None:
    """A source that does not exist (an unknown ``builtin:`` name, a missing file or folder) is refused at load,
    before Ray starts or the tracking store is touched (only the path is looked at; ingest reads it)."""
    from ssl_core.sources import source_path

    try:
        source_path(source, base)
    except (ValueError, FileNotFoundError) as error:
        raise FieldValueError("source", source, f"is not usable: {error}", "data.source") from None


def check_first_step(cfg: PipelineConfig) -> None:
    """The cross-field rules without which pretraining crashes at its first step; each names both keys.

    - A negative queue (a method config's ``queue_size`` > 0: MoCo, PCL, SimCLRv2's memory) takes the keys of both
      views of every worker's batch each step (of all workers when ``gather_distributed``): ``queue_size`` must hold
      ``2 x pretrain.batch_size x workers``.
    - A ViT backbone (``vit_*``) cuts images into patches of ``default_vit_patch_size(data.image_size)``:
      ``data.image_size`` and DINO's local crops (``local_crop_size``) must be multiples of it.
    """
    from ssl_core.backbones import default_vit_patch_size
    from ssl_core.views import local_crop_size

    method = cfg.method.config
    queue_size = getattr(method, "queue_size", 0)
    workers = max(1, cfg.scaling.num_workers) if getattr(method, "gather_distributed", False) else 1
    keys = 2 * cfg.pretrain.batch_size * workers
    if queue_size and queue_size < keys:
        raise FieldValueError("queue_size", queue_size, f"is smaller than the {keys} keys a step enqueues (2 views x "
                              f"pretrain.batch_size={cfg.pretrain.batch_size} x {workers} worker(s), "
                              "scaling.num_workers): raise the queue or lower the batch", "method.config.queue_size")
    if method.backbone.startswith("vit_"):
        patch = default_vit_patch_size(cfg.data.image_size)
        if cfg.data.image_size % patch:
            raise FieldValueError("image_size", cfg.data.image_size, f"is not a multiple of {patch}, the patch size of "
                                  f"method.config.backbone={method.backbone} at this size", "data.image_size")
        local_crops = getattr(method, "num_local_crops", 0)
        if local_crops and local_crop_size(cfg.data.image_size) % patch:
            raise FieldValueError("num_local_crops", local_crops, f"asks for local crops of "
                                  f"{local_crop_size(cfg.data.image_size)} px, not a multiple of the {patch} px "
                                  f"patches of method.config.backbone={method.backbone} at data.image_size="
                                  f"{cfg.data.image_size}", "method.config.num_local_crops")


def check_search_values(cfg: PipelineConfig, param_space: Mapping[str, Any]) -> None:
    """``check_first_step`` for every extreme value each dimension of the Tune search ``param_space`` can pick (the
    bounds of a range, every category of a choice), with a trial's workers (``tune.num_workers``); the error names
    the searched key and its value."""
    from tune_spaces import domain_values

    for section, dimensions in param_space.items():
        dimensions = dimensions["config"] if section == "method" else dimensions
        for name, domain in dimensions.items():
            key = f"{section}.config.{name}" if section == "method" else f"{section}.{name}"
            for value in domain_values(domain):
                overlay = {"method": {"config": {name: value}}} if section == "method" else {section: {name: value}}
                trial = cfg.with_overlay({**overlay, "scaling": {"num_workers": cfg.tune.num_workers}})
                try:
                    check_first_step(trial)
                except FieldValueError as error:
                    raise ValueError(f"tune: the search can pick {key}={value!r} (tune.space / tune.bounds), and a "
                                     f"trial with it would crash: {error}") from None


def machine_shortfall(cfg: PipelineConfig, cpus: float, gpus: float) -> str | None:
    """Why a worker group this config starts cannot be placed on ``cpus`` CPUs and ``gpus`` GPUs (one machine: the
    embedded local Ray), naming the keys; None when every one fits. Training stages reserve ``scaling.num_workers x
    scaling.cpus_per_worker`` CPUs (and ``gpus_per_worker`` GPUs with ``use_gpu``); a Tune trial ``tune.num_workers
    x tune.cpus_per_worker`` (+ GPUs) plus its 0.1-CPU driver. ``num_workers: 0`` trains in-process."""
    s, t = cfg.scaling, cfg.tune
    groups = [("scaling", s.num_workers, s.cpus_per_worker, s.gpus_per_worker if s.use_gpu else 0.0, 0.0)]
    if t.enabled:
        groups.append(("tune", t.num_workers, t.cpus_per_worker, t.gpus_per_worker, 0.1))
    for section, workers, cpus_each, gpus_each, extra_cpus in groups:
        if workers == 0:
            continue
        wanted_cpus, wanted_gpus = workers * cpus_each + extra_cpus, workers * gpus_each
        if wanted_cpus > cpus + 1e-9:
            return (f"{section}.num_workers={workers} x {section}.cpus_per_worker={cpus_each:g} needs "
                    f"{wanted_cpus:g} CPUs, and this machine's Ray has {cpus:g}")
        if wanted_gpus > gpus + 1e-9:
            return (f"{section}.num_workers={workers} x {section}.gpus_per_worker={gpus_each:g} needs "
                    f"{wanted_gpus:g} GPUs, and this machine's Ray has {gpus:g}")
    return None


def search_space(cfg: PipelineConfig, train_rows: int) -> tuple[dict[str, Any], str, str]:
    """``(param_space, metric, mode)`` of the tune section: the overlay ``{"method": {"config": ...},
    "pretrain": ...}`` of Ray Tune domains, validated against the method's and the pretrain section's ranges."""
    from tune_spaces import method_search_space, shared_search_space, validate_fields

    t = cfg.tune
    method_dims, metric, mode = method_search_space(cfg.method.name, train_rows, t.space, t.bounds)
    shared_dims = shared_search_space(cfg.pretrain.lr, cfg.pretrain.weight_decay, t.search_lr,
                                      t.search_weight_decay, t.bounds)
    validate_fields(PretrainSection, shared_dims, "tune space", "pretrain.")
    if not method_dims and not shared_dims:
        raise ValueError(f"tune: the space for method {cfg.method.name!r} searches nothing; "
                         "set tune.search_lr / tune.search_weight_decay or add tune.bounds")
    param_space: dict[str, Any] = {}
    if method_dims:
        param_space["method"] = {"config": method_dims}
    if shared_dims:
        param_space["pretrain"] = shared_dims
    return param_space, metric, mode


def finetune_search_space(cfg: PipelineConfig) -> tuple[dict[str, Any], str, str]:
    """``(param_space, metric, mode)`` of the fine-tune search (``tune.finetune``): the overlay ``{"finetune":
    {"semi": ..., "lr": ..., "weight_decay": ...}}`` of Ray Tune domains, validated against their sections' ranges."""
    from tune_spaces import shared_search_space, validate_fields
    from tune_spaces import semi_finetune

    t = cfg.tune
    semi_dims = semi_finetune.space(cfg.finetune.semi.algorithm)
    shared_dims = shared_search_space(cfg.finetune.lr, cfg.finetune.weight_decay, t.search_lr, t.search_weight_decay)
    validate_fields(FinetuneSection, shared_dims, "tune space", "finetune.")
    if not semi_dims and not shared_dims:
        raise FieldValueError("finetune", True, "searches nothing: finetune.semi.algorithm=none has no space; choose "
                              "an algorithm or set tune.search_lr / tune.search_weight_decay", "tune.finetune")
    return {"finetune": {**shared_dims, **({"semi": semi_dims} if semi_dims else {})}}, semi_finetune.METRIC, \
        semi_finetune.MODE


def _check_tune_trial(cfg: PipelineConfig) -> None:
    """A Tune trial pretrains for ``tune.epochs`` with the pretrain section's warmup (``trial_overlay``)."""
    if cfg.pretrain.warmup_epochs > cfg.tune.epochs:
        raise FieldValueError("warmup_epochs", cfg.pretrain.warmup_epochs,
                              f"exceeds tune.epochs={cfg.tune.epochs}: every Tune trial pretrains for tune.epochs, "
                              "and the learning-rate warmup must end within it", "pretrain.warmup_epochs")


def _check_search(cfg: PipelineConfig) -> None:
    """An enabled search must be able to run: its space (any dataset size) and every value it can pick
    (``check_search_values``), and Optuna when asked for."""
    check_search_values(cfg, search_space(cfg, train_rows=1 << 20)[0])
    if cfg.tune.searcher == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ValueError("tune.searcher=optuna needs optuna: pip install -e '.[optuna]'")


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


def config_value(values: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted ``key`` (``"scaling.use_gpu"``) of a nested mapping."""
    for part in key.split("."):
        values = values[part]
    return values

