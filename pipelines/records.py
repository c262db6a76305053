"""What each stage hands downstream: one frozen record per stage, small (MLflow run id, URIs, metrics), never a
model in memory.

``run_id`` and ``fingerprint`` are filled by the DAG once the stage's MLflow run exists. A finished stage's record
is stored as JSON in its run's ``sslflow.record`` tag (``to_json``), so a rerun that reuses the stage rebuilds it
(``from_dict``) without running anything.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R", bound="StageRecord")


@dataclass(frozen=True, kw_only=True)
class StageRecord:
    run_id: str = ""
    fingerprint: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def from_dict(cls: type[R], values: Mapping[str, Any]) -> R:
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class IngestRecord(StageRecord):
    """The Parquet dataset at ``path`` and its content hash (part of every downstream fingerprint)."""

    path: str
    content_hash: str
    num_classes: int


@dataclass(frozen=True, kw_only=True)
class TuneRecord(StageRecord):
    """The best hyperparameters found (``config_overlay``, applied to the consuming stages' config) and the search."""

    config_overlay: dict[str, Any]
    metric: str
    mode: str
    best_value: float
    best_trial: str
    trials: dict[str, int]
    search_seconds: float
    results_uri: str


@dataclass(frozen=True, kw_only=True)
class PretrainRecord(StageRecord):
    """The pretrained encoder (an MLflow PyTorch model) and the last Ray Train checkpoint of the whole method."""

    encoder_uri: str | None = None
    checkpoint_uri: str | None = None
    config_overlay: dict[str, Any] = field(default_factory=dict)
    """The tune stage's overlay this pretraining ran with (empty without tune). The DAG applies it to the stages
    downstream, as a ``TuneRecord``'s: those that rebuild the method to load the checkpoint (evaluate, finetune,
    tune_finetune) need the shapes it was trained with (e.g. a searched MoCo ``queue_size``)."""


@dataclass(frozen=True, kw_only=True)
class EvaluateRecord(StageRecord):
    plot_uri: str


@dataclass(frozen=True, kw_only=True)
class ClassifierRecord(StageRecord):
    """A trained ``ssl_core.classifier.Classifier`` (MLflow model): the fine-tuned teacher or the distilled student."""

    model_uri: str
    num_classes: int


def fraction_key(fraction: float) -> str:
    """How a labeled fraction names its teacher and metrics: ``0.01``, ``0.1``, ``1`` (``format(f, "g")``)."""
    return format(fraction, "g")


@dataclass(frozen=True, kw_only=True)
class FinetuneRecord(ClassifierRecord):
    """The fine-tuned teachers, one per labeled fraction (``teachers``: ``fraction_key`` -> MLflow model URI);
    ``model_uri`` and ``metrics["test_top1"]`` are those of ``finetune.label_fraction``."""

    teachers: dict[str, str]

    def teacher_uri(self, fraction: float) -> str:
        key = fraction_key(fraction)
        if key not in self.teachers:
            raise KeyError(f"no teacher fine-tuned on fraction {key}; fine-tuned: {', '.join(self.teachers)}")
        return self.teachers[key]


@dataclass(frozen=True, kw_only=True)
class RegisterRecord(StageRecord):
    model_name: str
    version: str
    teacher_version: str


@dataclass(frozen=True, kw_only=True)
class PromoteRecord(StageRecord):
    promoted: bool
    champion_version: str | None
    reason: str
    model_name: str
    version: str
