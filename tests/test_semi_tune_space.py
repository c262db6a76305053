"""``tune_spaces.semi_finetune``: every algorithm's space samples points that the pipeline config accepts as an
overlay, and a space reaching outside a field's range is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray import tune

from pipelines.config import config_from_mapping
from ssl_core.semi import ALGORITHMS, SemiConfig
from tune_spaces import validate_fields
from tune_spaces.semi_finetune import overlay, space


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sampled_points_are_valid_overlays(algorithm: str, tmp_path: Path) -> None:
    base = config_from_mapping({"finetune": {"semi": {"algorithm": algorithm}}}, tmp_path)
    domains = space(algorithm)
    for _ in range(5):
        point = {name: domain.sample() for name, domain in domains.items()}
        tuned = base.with_overlay(overlay(point))
        assert tuned.finetune.semi.algorithm == algorithm
        for name, value in point.items():
            assert getattr(tuned.finetune.semi, name) == pytest.approx(value) if isinstance(value, float) \
                else getattr(tuned.finetune.semi, name) == value


def test_out_of_range_domains_and_unknown_algorithms_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"finetune\.semi\.threshold=1\.5 is out of range"):
        validate_fields(SemiConfig, {"threshold": tune.uniform(0.5, 1.5)}, "space", "finetune.semi.")
    with pytest.raises(ValueError, match="flexmatch"):
        space("flexmatch")
    base = config_from_mapping({}, tmp_path)
    with pytest.raises(ValueError, match=r"finetune\.semi\.threshold=2\.0 is out of range"):
        base.with_overlay(overlay({"threshold": 2.0}))
