"""Promote stage: move the ``champion`` alias to the candidate version only if it beats the current champion on the
validation split, never on the test split.

The gate (``GATE_METRIC``, ``val_top1``): top-1 on ingest's ``val`` split, which no training step reads (pretraining
reads ``train`` only, ``pipelines.knn_monitor.pretrain_splits``; fine-tuning and distillation read labeled and
unlabeled ``train`` rows) and which is not the reported test split. ``test_top1`` is reported beside it in the reason
and the stage's metrics, never compared. The candidate is promoted when there is no champion, or when
``candidate > champion`` and ``candidate >= champion + registry.promote_margin``.

Refused without ``force`` (a person's decision, ``sslflow promote --force``), with the reason recorded:

- the two were trained on different data: their ``dataset_hash`` tags differ (the reason names both hashes);
- either has no ``val_top1`` tag (registered before the gate used the val split, or data without a val split).

Never wrong under faults: a registry error other than "no such alias/model" fails the stage (``tracking.
version_for_alias``); two promoters of one model, in any processes or machines sharing the registry, are serialised
by ``tracking.registry_lock``, so the decision is made on the champion that is current when the aliases move and the
outcome is that of some order of the two (the better one ends champion). The replaced champion keeps the alias
``previous_champion``; the aliases are moved champion first (``champion`` is never missing) and re-read after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines import tracking
from pipelines.config import PipelineConfig, TrackingConfig
from pipelines.records import PromoteRecord, RegisterRecord, StageRecord

GATE_METRIC = "val_top1"
REPORTED_METRIC = "test_top1"
DATASET_TAG = "dataset_hash"
PREVIOUS_CHAMPION = "previous_champion"


@dataclass(frozen=True)
class Contender:
    """What the gate reads of one registered version: its gate metric, reported metric and dataset hash (tags)."""

    version: str
    gate: float | None
    reported: float | None
    dataset_hash: str | None

    @classmethod
    def of(cls, model_version) -> Contender:
        tags = model_version.tags

        def number(key: str) -> float | None:
            return float(tags[key]) if key in tags else None

        return cls(str(model_version.version), number(GATE_METRIC), number(REPORTED_METRIC), tags.get(DATASET_TAG))

    def describe(self) -> str:
        gate = "none" if self.gate is None else f"{self.gate:.4f}"
        reported = "" if self.reported is None else f" ({REPORTED_METRIC} {self.reported:.4f})"
        return f"{GATE_METRIC}={gate}{reported}"


def promotion_decision(candidate: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """(promote?, reason) on the gate metric. Promote when there is no champion or ``candidate >= champion + margin``
    (and > champion)."""
    if champion is None:
        return True, "no champion yet"
    if candidate > champion and candidate >= champion + margin:
        return True, f"candidate {GATE_METRIC}={candidate:.4f} beats champion {champion:.4f} by >= {margin}"
    return False, f"candidate {GATE_METRIC}={candidate:.4f} does not beat champion {champion:.4f} by {margin}"


def comparison_refusal(candidate: Contender, champion: Contender | None) -> str | None:
    """Why the two cannot be compared on the gate (different data, a missing ``val_top1``), or None."""
    if candidate.gate is None:
        return (f"candidate version {candidate.version} has no {GATE_METRIC} tag (no labeled val split, or registered "
                f"before the gate used it)")
    if champion is None:
        return None
    if candidate.dataset_hash != champion.dataset_hash:
        return (f"candidate version {candidate.version} was trained on dataset {candidate.dataset_hash}, champion "
                f"version {champion.version} on dataset {champion.dataset_hash}: their {GATE_METRIC} are not "
                "comparable")
    if champion.gate is None:
        return (f"champion version {champion.version} has no {GATE_METRIC} tag (registered before the gate used the "
                "val split)")
    return None


def decide(candidate: Contender, champion: Contender | None, margin: float, force: bool) -> tuple[bool, str]:
    """(promote?, reason), the reason naming the val metric compared and the test metric reported."""
    refusal = comparison_refusal(candidate, champion)
    if refusal is not None:
        promoted, reason = False, f"refused: {refusal}; a person may promote it with --force"
    else:
        promoted, reason = promotion_decision(candidate.gate, None if champion is None else champion.gate, margin)
        reason += f" [candidate {candidate.describe()}" + ("" if champion is None else
                                                          f"; champion {champion.version} {champion.describe()}") + "]"
    if force and not promoted:
        return True, f"forced by a person ({reason})"
    return promoted, reason


def promote(tracking_config: TrackingConfig, name: str, version: str, margin: float,
            force: bool = False) -> dict[str, Any]:
    """Apply the gate to ``name/version`` (or skip it with ``force``) and move the aliases, holding the model's
    promotion lock; returns ``{"promoted", "champion_version", "reason", "candidate_val_top1", "candidate_test_top1"}``.
    A registry error propagates (nothing is decided on a guess)."""
    with tracking.registry_lock(tracking_config, name):
        candidate = Contender.of(tracking.model_version(tracking_config, name, version))
        current_version = tracking.version_for_alias(tracking_config, name, tracking.CHAMPION)
        current = None if current_version is None else Contender.of(current_version)
        scores = {"candidate_val_top1": candidate.gate, "candidate_test_top1": candidate.reported}
        if current is not None and current.version == candidate.version:
            return {"promoted": False, "champion_version": candidate.version, "reason": "already champion", **scores}
        promoted, reason = decide(candidate, current, margin, force)
        if promoted:
            _move_aliases(tracking_config, name, candidate.version, None if current is None else current.version)
        tracking.set_version_tag(tracking_config, name, version, tracking.PROMOTION_TAG, reason)
    champion_version = candidate.version if promoted else (None if current is None else current.version)
    return {"promoted": promoted, "champion_version": champion_version, "reason": reason, **scores}


def _move_aliases(tracking_config: TrackingConfig, name: str, version: str, replaced: str | None) -> None:
    """``champion`` -> ``version``, then ``previous_champion`` -> ``replaced``; re-read both (compare-and-set under the
    lock: a writer that does not take the lock shows up here as an error, not as a silent wrong champion)."""
    tracking.set_alias(tracking_config, name, tracking.CHAMPION, version)
    if replaced is not None:
        tracking.set_alias(tracking_config, name, PREVIOUS_CHAMPION, replaced)
    expected = {tracking.CHAMPION: version, PREVIOUS_CHAMPION: replaced}
    for alias, wanted in expected.items():
        found = tracking.version_for_alias(tracking_config, name, alias)
        if wanted is not None and (found is None or str(found.version) != wanted):
            raise RuntimeError(f"{name}@{alias} is {None if found is None else found.version} right after promote set "
                               f"it to {wanted}: another writer moved it without the promotion lock")


def run(cfg: PipelineConfig, run_id: str, inputs: dict[str, StageRecord]) -> PromoteRecord:
    registered: RegisterRecord = inputs["register"]
    decision = promote(cfg.tracking, registered.model_name, registered.version, cfg.registry.promote_margin)
    tracking.set_tags(cfg.tracking, run_id, {"promoted": decision["promoted"], "reason": decision["reason"],
                                             "champion_version": decision["champion_version"]})
    scores = {key: decision[key] for key in ("candidate_val_top1", "candidate_test_top1") if decision[key] is not None}
    tracking.log_metrics(cfg.tracking, run_id, [(0, {"promoted": float(decision["promoted"]), **scores})])
    return PromoteRecord(promoted=decision["promoted"], champion_version=decision["champion_version"],
                         reason=decision["reason"], model_name=registered.model_name, version=registered.version)
