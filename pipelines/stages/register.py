"""Register stage: the distilled student, the fine-tuned teacher it was distilled from (``distill.teacher_fraction``)
and the pretrained encoder become new versions in the MLflow Model Registry (``<model_name>``,
``<model_name>-teacher`` and ``<model_name>-encoder``), tagged with their metrics, the dataset hash and the pipeline
run id (``val_top1``, what promotion gates on, beside ``test_top1``, reported), and described (what data, which
method, the metrics, how to load); the student version gets the alias ``challenger``. Each registration is all or
nothing.

What is registered is not the training run's pickled module but a served model logged in this stage's run
(``pipelines.serving.models``): an MLflow ``python_function`` model that takes PNG/JPEG bytes, preprocesses them
as evaluation did and answers class names with probabilities (the encoder: L2-normalised features), loadable with
``ssl_core`` alone. Each also gets an ONNX copy (``onnx/<role>.onnx``, checked with onnxruntime against torch; the
max abs difference is the metric ``onnx_max_abs_diff_<role>``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from torch import nn

from pipelines import tracking
from pipelines.config import PipelineConfig
from pipelines.datasets import read_manifest
from pipelines.knn_monitor import pretrain_rows
from pipelines.records import (ClassifierRecord, FinetuneRecord, IngestRecord, PretrainRecord, RegisterRecord,
                               StageRecord, fraction_key)
from pipelines.serving.models import log_served_model
from pipelines.serving.onnx_export import export_onnx
from ssl_core.serving import ServingSpec

ROLES = ("student", "teacher", "encoder")


def registered_name(model_name: str, role: str) -> str:
    """Registry name of ``role``: the student is ``model_name`` itself, the others ``<model_name>-<role>``."""
    return model_name if role == "student" else f"{model_name}-{role}"


def serving_specs(cfg: PipelineConfig, num_classes: int, mean: tuple, std: tuple) -> dict[str, ServingSpec]:
    """The served-model spec of each role: its architecture recipe, evaluation's preprocessing, the class names."""
    manifest = read_manifest(cfg.data.path)
    class_names = tuple(manifest.get("class_names") or [str(index) for index in range(num_classes)])
    method = {"method": cfg.method.name, "method_config": dataclasses.asdict(cfg.method.config),
              "train_rows": pretrain_rows(manifest)}
    common = {"image_size": cfg.data.image_size, "mean": tuple(mean), "std": tuple(std)}
    return {
        "student": ServingSpec(kind="classifier", class_names=class_names, **common,
                               architecture={"builder": "student", "backbone": cfg.distill.student_backbone,
                                             "num_classes": num_classes}),
        "teacher": ServingSpec(kind="classifier", class_names=class_names, **common,
                               architecture={"builder": "method_classifier", **method,
                                             "head_layers": cfg.finetune.head_layers, "num_classes": num_classes}),
        "encoder": ServingSpec(kind="encoder", **common, architecture={"builder": "method_encoder", **method}),
    }


def validation_tags(distill_metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"student": {"val_top1": ...}, "teacher": {"val_top1": ...}}`` from the distill stage's metrics (both scored
    there on the val split, which no stage trains on); empty when the data has no labeled val rows."""
    return {"student": {"val_top1": distill_metrics["val_top1"]} if "val_top1" in distill_metrics else {},
            "teacher": ({"val_top1": distill_metrics["teacher_val_top1"]}
                        if "teacher_val_top1" in distill_metrics else {})}


def descriptions(cfg: PipelineConfig, role: str, tags: dict, name: str) -> tuple[str, str]:
    """(registered model description, version description)."""
    what = {"student": f"the distilled student ({cfg.distill.student_backbone})",
            "teacher": f"the {cfg.method.name} encoder fine-tuned on a labeled fraction (SimCLRv2 teacher)",
            "encoder": f"the {cfg.method.name} self-supervised encoder"}[role]
    answers = ("L2-normalised features in column `embedding`" if role == "encoder"
               else "`label`, `label_index`, `probability` and `probabilities` (one per class)")
    uri = (f"models:/{name}@champion" if role == "student"
           else f"models:/{name}/<version> (the champion student's tag `{role}` names it)")
    load = (f"Load: `mlflow.pyfunc.load_model('{uri}')` (needs ssl_core only, shipped in the "
            f"model) or `mlflow models serve -m {uri.split(' ')[0]}`; input: a column `image` of PNG/JPEG "
            f"bytes (base64 in JSON), resized to {cfg.data.image_size} px and normalised as evaluation did; "
            f"output: {answers}. ONNX copy: artifact `onnx/{role}.onnx` of the register run.")
    model_description = f"sslflow: {what}, trained by the pipeline `{cfg.name}`. {load}"
    metrics = ", ".join(f"{key}={tags[key]}" for key in ("val_top1", "test_top1", "label_fraction") if key in tags)
    version_description = (f"{what}; method {cfg.method.name}; data {cfg.data.path} ({tags['dataset_hash']}); "
                           f"pipeline run {tags['pipeline_run_id']}; {metrics or 'no held-out metric'}. {load}")
    return model_description, version_description


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> RegisterRecord:
    ingest: IngestRecord = inputs["ingest"]
    finetune: FinetuneRecord = inputs["finetune"]
    student: ClassifierRecord = inputs["distill"]
    fraction = cfg.teacher_fraction  # the teacher that was distilled
    teacher_top1 = finetune.metrics[f"test_top1_fraction_{fraction_key(fraction)}"]
    pretrain: PretrainRecord = inputs["pretrain"]  # the encoder the teacher was fine-tuned from
    if not pretrain.encoder_uri:
        raise ValueError(f"pretrain run {pretrain.run_id} logged no encoder to register")
    modules: dict[str, nn.Module] = {
        "student": tracking.load_torch_model(cfg.tracking, student.model_uri),
        "teacher": tracking.load_torch_model(cfg.tracking, finetune.teacher_uri(fraction)),
        "encoder": tracking.load_torch_model(cfg.tracking, pretrain.encoder_uri),
    }
    teacher_module = modules["teacher"]
    specs = serving_specs(cfg, ingest.num_classes, teacher_module.mean, teacher_module.std)
    served_uris = {role: log_served_model(cfg.tracking, run_id, role, modules[role], specs[role]) for role in ROLES}
    onnx_differences = {}
    with tempfile.TemporaryDirectory() as directory:
        for role in ROLES:
            path = Path(directory) / f"{role}.onnx"
            onnx_differences[f"onnx_max_abs_diff_{role}"] = export_onnx(modules[role], specs[role], path)
            tracking.log_artifact(cfg.tracking, run_id, path, "onnx")

    common = {"dataset_hash": ingest.content_hash, "pipeline_run_id": tracking.parent_run_id(cfg.tracking, run_id),
              "stage_run_id": run_id, "method": cfg.method.name}
    name = cfg.registry.model_name
    validation = validation_tags(student.metrics)
    role_tags = {
        "teacher": {**common, "label_fraction": fraction, **validation["teacher"], "test_top1": teacher_top1,
                    "role": "teacher", "source_model_uri": finetune.teacher_uri(fraction)},
        "encoder": {**common, "role": "encoder", "source_model_uri": pretrain.encoder_uri,
                    "pretrain_run_id": pretrain.run_id},
    }
    versions = {}
    for role in ("teacher", "encoder"):
        versions[role] = tracking.register_version(cfg.tracking, served_uris[role], registered_name(name, role),
                                                   role_tags[role])
    role_tags["student"] = {**common, "label_fraction": fraction, **validation["student"],
                            "test_top1": student.metrics["test_top1"], "role": "student",
                            "teacher": f"{name}-teacher/{versions['teacher']}",
                            "encoder": f"{name}-encoder/{versions['encoder']}",
                            "source_model_uri": student.model_uri}
    versions["student"] = tracking.register_version(cfg.tracking, served_uris["student"], name, role_tags["student"],
                                                    aliases=[tracking.CHALLENGER])
    for role in ROLES:
        registered = registered_name(name, role)
        model_description, version_description = descriptions(cfg, role, role_tags[role], registered)
        tracking.describe_registered_model(cfg.tracking, registered, model_description, versions[role],
                                           version_description)
    metrics = {"test_top1": student.metrics["test_top1"], "teacher_test_top1": teacher_top1, **onnx_differences,
               **{key: student.metrics[key] for key in ("val_top1", "teacher_val_top1") if key in student.metrics}}
    tracking.log_metrics(cfg.tracking, run_id, [(0, metrics)])
    tracking.set_tags(cfg.tracking, run_id, {"registered_version": versions["student"],
                                             "registered_teacher_version": versions["teacher"],
                                             "registered_encoder_version": versions["encoder"]})
    return RegisterRecord(model_name=name, version=versions["student"], teacher_version=versions["teacher"],
                          metrics=metrics)
