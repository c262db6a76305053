"""Register stage: the distilled student and the fine-tuned teacher become new versions in the MLflow Model
Registry (``<model_name>`` and ``<model_name>-teacher``), tagged with their metrics, the dataset hash and the
pipeline run id; the student version gets the alias ``challenger``. Each registration is all or nothing.
"""

from __future__ import annotations

from pipelines import tracking
from pipelines.config import PipelineConfig
from pipelines.records import ClassifierRecord, IngestRecord, RegisterRecord, StageRecord


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> RegisterRecord:
    ingest: IngestRecord = inputs["ingest"]
    teacher: ClassifierRecord = inputs["finetune"]
    student: ClassifierRecord = inputs["distill"]
    common = {"dataset_hash": ingest.content_hash, "pipeline_run_id": tracking.parent_run_id(cfg.tracking, run_id),
              "stage_run_id": run_id, "method": cfg.method.name, "label_fraction": cfg.finetune.label_fraction}
    name = cfg.registry.model_name
    teacher_version = tracking.register_version(
        cfg.tracking, teacher.model_uri, f"{name}-teacher",
        {**common, "test_top1": teacher.metrics["test_top1"], "role": "teacher"},
    )
    student_version = tracking.register_version(
        cfg.tracking, student.model_uri, name,
        {**common, "test_top1": student.metrics["test_top1"], "role": "student",
         "teacher": f"{name}-teacher/{teacher_version}"},
        aliases=[tracking.CHALLENGER],
    )
    metrics = {"test_top1": student.metrics["test_top1"], "teacher_test_top1": teacher.metrics["test_top1"]}
    tracking.log_metrics(cfg.tracking, run_id, [(0, metrics)])
    tracking.set_tags(cfg.tracking, run_id, {"registered_version": student_version,
                                             "registered_teacher_version": teacher_version})
    return RegisterRecord(model_name=name, version=student_version, teacher_version=teacher_version, metrics=metrics)
