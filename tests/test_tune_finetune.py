"""The fine-tune search (``tune.finetune``, stage ``tune_finetune``): its space and graph edges from the config, and
a real Ray Tune search of fine-tune trials from the shared run's pretrain checkpoint, scored on the val split."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.config import config_from_mapping, finetune_search_space
from pipelines.dag import STAGES, fingerprint, run_pipeline, stages_for
from pipelines.records import TuneRecord
from pipelines.stages.tune import TRIAL_STAGE
from tune_spaces import semi_finetune

FIXMATCH = {"algorithm": "fixmatch", "unlabeled_ratio": 2, "unlabeled_rows": 300, "threshold": 0.5}


def test_the_search_space_graph_and_fingerprint_come_from_the_config(tmp_path: Path) -> None:
    cfg = config_from_mapping({"tune": {"finetune": True, "search_lr": True}, "finetune": {"semi": FIXMATCH}},
                              tmp_path)
    space, metric, mode = finetune_search_space(cfg)
    assert (metric, mode) == ("val_top1", "max")
    assert set(space) == {"finetune"} and set(space["finetune"]) == {"lr", "semi"}
    assert set(space["finetune"]["semi"]) == set(semi_finetune.space("fixmatch"))
    graph = stages_for(cfg)
    assert graph["tune_finetune"].upstream == ("ingest", "pretrain") and "tune" not in graph
    assert "tune_finetune" in graph["finetune"].upstream
    plain = config_from_mapping({"finetune": {"semi": FIXMATCH}}, tmp_path)
    assert "tune_finetune" not in stages_for(plain) and "tune_finetune" not in stages_for(plain)["finetune"].upstream
    stage, values = STAGES["tune_finetune"], cfg.to_dict()
    for change in ({"tune": {"num_samples": 3}}, {"finetune": {"semi": {"threshold": 0.6}}}):
        assert fingerprint(stage, cfg.with_overlay(change).to_dict(), {}, "h") != fingerprint(stage, values, {}, "h")
    with pytest.raises(ValueError, match=r"^tune\.finetune=True searches nothing"):
        config_from_mapping({"tune": {"finetune": True}}, tmp_path)  # semi none, no lr / weight decay searched


@pytest.mark.slow  # two fine-tune trials from the shared run's pretrain checkpoint, on a copy of its store
def test_fine_tune_trials_search_semi_on_val_and_their_best_overlays_finetune(quickstart_run, ray_session,
                                                                               tmp_path: Path) -> None:
    shutil.copy(quickstart_run.workdir / "mlflow.db", tmp_path / "mlflow.db")
    values = {**quickstart_run.values,
              "tracking": {**quickstart_run.values["tracking"], "uri": f"sqlite:///{tmp_path}/mlflow.db"},
              "scaling": {**quickstart_run.values["scaling"], "storage_path": str(tmp_path / "runs")},
              "tune": {"finetune": True, "num_samples": 2, "epochs": 1, "grace_period": 1, "num_workers": 1,
                       "cpus_per_worker": 0.5, "max_concurrent_trials": 1}}
    cfg = config_from_mapping(values)
    result = run_pipeline(cfg, until="tune_finetune")
    assert {p.name for p in result.plan if p.reused is not None} == {"ingest", "pretrain"}
    record = result.records["tune_finetune"]
    assert isinstance(record, TuneRecord) and (record.metric, record.mode) == ("val_top1", "max")
    assert record.trials == {"completed": 2, "stopped_early": 0, "errored": 0}
    searched = set(semi_finetune.space("fixmatch"))
    assert set(record.config_overlay) == {"finetune"} and set(record.config_overlay["finetune"]["semi"]) == searched

    client = MlflowClient(cfg.tracking.uri)
    stage_run = client.get_run(record.run_id)
    trials = client.search_runs([stage_run.info.experiment_id],
                                f"tags.`{tracking.PARENT_TAG}` = '{record.run_id}'")
    assert len(trials) == 2 and all(t.data.tags[tracking.STAGE_TAG] == TRIAL_STAGE for t in trials)
    scores = {t.data.tags[tracking.TRIAL_TAG]: t.data.metrics["val_top1"] for t in trials}
    assert all(0.0 <= score <= 1.0 for score in scores.values())
    assert record.best_value == pytest.approx(max(scores.values())) == scores[record.best_trial]
    assert not any("test_top1" in t.data.metrics for t in trials)  # trials never look at the test split
    tuned = cfg.with_overlay(record.config_overlay).finetune.semi  # what execute_stage hands the finetune stage
    best = next(t for t in trials if t.data.tags[tracking.TRIAL_TAG] == record.best_trial)
    for name in searched:
        assert str(getattr(tuned, name)) == best.data.params[f"finetune.semi.{name}"]
