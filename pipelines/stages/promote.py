"""Promote stage: move the ``champion`` alias to the candidate version only if its ``test_top1`` beats the
current champion's by at least ``registry.promote_margin``; otherwise the champion stays and the reason is
recorded. The replaced champion keeps the alias ``previous_champion`` (it stays reachable); since an alias move
is a single registry write, ``champion`` is never missing.
"""

from __future__ import annotations

from typing import Any

from pipelines import tracking
from pipelines.config import PipelineConfig, TrackingConfig
from pipelines.records import PromoteRecord, RegisterRecord, StageRecord

METRIC = "test_top1"
PREVIOUS_CHAMPION = "previous_champion"


def promotion_decision(candidate: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """(promote?, reason). Promote when there is no champion or ``candidate >= champion + margin`` (and > champion)."""
    if champion is None:
        return True, f"no champion yet; candidate {METRIC}={candidate:.4f}"
    if candidate > champion and candidate >= champion + margin:
        return True, f"candidate {METRIC}={candidate:.4f} beats champion {champion:.4f} by >= {margin}"
    return False, f"candidate {METRIC}={candidate:.4f} does not beat champion {champion:.4f} by {margin}"


def promote(tracking_config: TrackingConfig, name: str, version: str, margin: float, force: bool = False) -> dict[str, Any]:
    """Apply the gate to ``name/version`` (or skip it with ``force``) and move the aliases; returns the decision."""
    candidate = tracking.model_version(tracking_config, name, version)
    current = tracking.version_for_alias(tracking_config, name, tracking.CHAMPION)
    if current is not None and str(current.version) == str(version):
        return {"promoted": False, "champion_version": str(version), "reason": "already champion"}
    champion_metric = float(current.tags[METRIC]) if current is not None and METRIC in current.tags else None
    promoted, reason = promotion_decision(float(candidate.tags[METRIC]), champion_metric, margin)
    if force and not promoted:
        promoted, reason = True, f"forced by a person ({reason})"
    if promoted:
        tracking.set_alias(tracking_config, name, tracking.CHAMPION, version)
        if current is not None:
            tracking.set_alias(tracking_config, name, PREVIOUS_CHAMPION, current.version)
    tracking.set_version_tag(tracking_config, name, version, tracking.PROMOTION_TAG, reason)
    champion_version = str(version) if promoted else (str(current.version) if current is not None else None)
    return {"promoted": promoted, "champion_version": champion_version, "reason": reason}


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> PromoteRecord:
    registered: RegisterRecord = inputs["register"]
    decision = promote(cfg.tracking, registered.model_name, registered.version, cfg.registry.promote_margin)
    tracking.set_tags(cfg.tracking, run_id, {"promoted": decision["promoted"], "reason": decision["reason"],
                                             "champion_version": decision["champion_version"]})
    tracking.log_metrics(cfg.tracking, run_id, [(0, {"promoted": float(decision["promoted"])})])
    return PromoteRecord(**decision, model_name=registered.model_name, version=registered.version)
