"""Register stage: the distilled student and the fine-tuned teacher it was distilled from
(``distill.teacher_fraction``) become new versions in the MLflow Model Registry (``<model_name>`` and
``<model_name>-teacher``), tagged with their metrics, the dataset hash and the pipeline run id; the student
version gets the alias ``challenger``. Each registration is all or nothing.
"""

from __future__ import annotations

from pipelines import tracking
from pipelines.config import PipelineConfig
from pipelines.records import ClassifierRecord, FinetuneRecord, IngestRecord, RegisterRecord, StageRecord, fraction_key


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> RegisterRecord:
    ingest: IngestRecord = inputs["ingest"]
    finetune: FinetuneRecord = inputs["finetune"]
    student: ClassifierRecord = inputs["distill"]
    fraction = cfg.teacher_fraction  # the teacher that was distilled
    teacher_top1 = finetune.metrics[f"test_top1_fraction_{fraction_key(fraction)}"]
    common = {"dataset_hash": ingest.content_hash, "pipeline_run_id": tracking.parent_run_id(cfg.tracking, run_id),
              "stage_run_id": run_id, "method": cfg.method.name, "label_fraction": fraction}
    name = cfg.registry.model_name
    teacher_version = tracking.register_version(
        cfg.tracking, finetune.teacher_uri(fraction), f"{name}-teacher",
        {**common, "test_top1": teacher_top1, "role": "teacher"},
    )
    student_version = tracking.register_version(
        cfg.tracking, student.model_uri, name,
        {**common, "test_top1": student.metrics["test_top1"], "role": "student",
         "teacher": f"{name}-teacher/{teacher_version}"},
        aliases=[tracking.CHALLENGER],
    )
    metrics = {"test_top1": student.metrics["test_top1"], "teacher_test_top1": teacher_top1}
    tracking.log_metrics(cfg.tracking, run_id, [(0, metrics)])
    tracking.set_tags(cfg.tracking, run_id, {"registered_version": student_version,
                                             "registered_teacher_version": teacher_version})
    return RegisterRecord(model_name=name, version=student_version, teacher_version=teacher_version, metrics=metrics)
