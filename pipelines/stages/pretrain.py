"""Pretrain stage: the configured method on Ray Train workers (``pipelines.pretraining``); its last checkpoint is
logged as an artifact, the encoder as an MLflow PyTorch model.

A restarted worker group (``FailureConfig``) resumes from the latest checkpoint: epoch, optimizer step, schedules
and method state continue. A new attempt of the stage (same fingerprint, after a FAILED or KILLED one) starts from
the newest checkpoint that loads of the earlier attempts (``pipelines.resume``).
"""

from __future__ import annotations

from pathlib import Path

from pipelines import resume, tracking
from pipelines.config import PipelineConfig
from pipelines.pretraining import fit_pretraining
from pipelines.ray_train import train_run_name
from pipelines.records import PretrainRecord, StageRecord, TuneRecord
from pipelines.train_loop import CHECKPOINT_FILE


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> PretrainRecord:
    earlier = resume.resume_point(cfg, "pretrain", run_id, resume.earlier_attempts(cfg.tracking, run_id), "pretrain")
    result = fit_pretraining(cfg, run_id, train_run_name("pretrain", run_id),
                             resume_from=None if earlier is None else earlier.checkpoint)
    checkpoint_uri = None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as directory:
            checkpoint_uri = tracking.log_artifact(cfg.tracking, run_id, Path(directory) / CHECKPOINT_FILE,
                                                   "checkpoints")
    outcome = result.return_value
    overlay = next((record.config_overlay for record in inputs.values() if isinstance(record, TuneRecord)), {})
    return PretrainRecord(metrics=outcome["metrics"], encoder_uri=outcome["encoder_uri"], checkpoint_uri=checkpoint_uri,
                          config_overlay=overlay)
