"""The pipeline config's ``finetune.semi``, ``finetune.label_fractions`` and ``distill.teacher_fraction``: parsed,
validated with errors naming the key, carried across the Ray boundary, and part of the stages' fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import PipelineConfig, config_from_mapping
from pipelines.dag import STAGES, fingerprint
from pipelines.records import FinetuneRecord
from ssl_core.semi import SemiConfig


def test_semi_section_parses_and_round_trips(tmp_path: Path) -> None:
    cfg = config_from_mapping({"finetune": {"label_fractions": [0.01, 0.1, 1.0],
                                            "semi": {"algorithm": "fixmatch", "threshold": 0.9}},
                               "distill": {"teacher_fraction": 0.01}}, tmp_path)
    assert cfg.finetune.semi == SemiConfig(algorithm="fixmatch", threshold=0.9)
    assert cfg.finetune.fractions == (0.01, 0.1, 1.0) and cfg.distill.teacher_fraction == 0.01
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
    default = config_from_mapping({}, tmp_path)
    assert default.finetune.semi.algorithm == "none" and default.finetune.fractions == (0.1,)
    config = cfg.to_dict()
    assert fingerprint(STAGES["finetune"], config, {}, "h") != fingerprint(STAGES["finetune"], default.to_dict(), {}, "h")
    tuned = cfg.with_overlay({"finetune": {"semi": {"threshold": 0.7}}})
    assert tuned.finetune.semi == SemiConfig(algorithm="fixmatch", threshold=0.7)


@pytest.mark.parametrize("values, message", [
    ({"finetune": {"semi": {"algorithm": "flexmatch"}}}, r"^finetune\.semi\.algorithm='flexmatch' is not one of"),
    ({"finetune": {"semi": {"unlabeled_ratio": 0}}}, r"^finetune\.semi\.unlabeled_ratio=0 is out of range"),
    ({"finetune": {"semi": {"bogus": 1}}}, r"^unknown key finetune\.semi\.bogus"),
    ({"finetune": {"semi": [1]}}, r"^finetune\.semi must be a mapping"),
    ({"finetune": {"label_fractions": [0.01, 0.5]}}, r"^finetune\.label_fraction=0\.1 is not one of"),
    ({"finetune": {"label_fractions": [0.1, 0.1]}}, r"^finetune\.label_fractions=\[0\.1, 0\.1\] holds a fraction twice"),
    ({"finetune": {"label_fractions": [0.1, 2.0]}}, r"^finetune\.label_fractions=\[0\.1, 2\.0\] must hold numbers"),
    ({"distill": {"teacher_fraction": 0.5}}, r"^distill\.teacher_fraction=0\.5 is not one of the fine-tuned fractions"),
])
def test_bad_values_name_their_key(values: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_mapping(values, tmp_path)


def test_finetune_record_names_a_teacher_per_fraction() -> None:
    record = FinetuneRecord(model_uri="runs:/b/classifier", num_classes=10,
                            teachers={"0.01": "runs:/a/classifier", "0.1": "runs:/b/classifier"})
    assert record.teacher_uri(0.01) == "runs:/a/classifier"
    assert FinetuneRecord.from_dict(json.loads(record.to_json())) == record
    with pytest.raises(KeyError, match="no teacher fine-tuned on fraction 0.5; fine-tuned: 0.01, 0.1"):
        record.teacher_uri(0.5)


def test_summary_shows_every_fractions_teacher_and_marks_the_distilled_one(tmp_path: Path) -> None:
    from pipelines.summary import _teacher_rows

    cfg = config_from_mapping({"finetune": {"label_fractions": [0.01, 0.1, 1.0]},
                               "distill": {"teacher_fraction": 0.01}}, tmp_path)
    rows = _teacher_rows(cfg, {"test_top1_fraction_0.01": 0.5, "test_top1_fraction_0.1": 0.75,
                               "test_top1_fraction_1": 0.9, "test_top1": 0.75})
    assert rows == [("fine-tuned teacher (1% labels, distilled)", "0.5000"),
                    ("fine-tuned teacher (10% labels)", "0.7500"), ("fine-tuned teacher (100% labels)", "0.9000")]
