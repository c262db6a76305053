"""Whether a FINISHED stage run can still be reused: the artifacts its record names (the pretrain checkpoint and
encoder, the fine-tuned and distilled models, ...) must exist and be what they were when it finished.

When a stage finishes, the DAG records ``tracking.artifact_digest`` of every artifact URI in its record
(``record_digests``) in the run's ``sslflow.artifact_digests`` tag; before reusing the run, ``reuse_problem``
computes them again (a download of each artifact) and names the first one missing or changed. A run without the
tag (finished before sslflow recorded digests) is not reused either: nothing says its artifacts are whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pipelines import tracking
from pipelines.config import TrackingConfig
from pipelines.records import StageRecord

ARTIFACT_SCHEMES = ("runs:/", "models:/")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def artifact_uris(record: StageRecord) -> list[str]:
    """Every MLflow artifact URI (``runs:/``, ``models:/``) in ``record``'s fields, nested ones included, sorted."""
    values = json.loads(record.to_json())
    return sorted({text for text in _strings(values) if text.startswith(ARTIFACT_SCHEMES)})


def record_digests(tracking_config: TrackingConfig, record: StageRecord) -> dict[str, str | None]:
    """``{uri: artifact_digest}`` of ``record``'s artifacts, for the ``sslflow.artifact_digests`` tag."""
    return {uri: tracking.artifact_digest(tracking_config, uri) for uri in artifact_uris(record)}


def reuse_problem(tracking_config: TrackingConfig, record: StageRecord) -> str | None:
    """Why the finished run of ``record`` cannot be reused (its artifacts are missing or changed, or were never
    checksummed), or None when every artifact is as it was when the run finished."""
    tags = tracking.get_run(tracking_config, record.run_id).data.tags
    if tracking.ARTIFACT_DIGESTS_TAG not in tags:
        return f"run {record.run_id} finished without artifact checksums (an older sslflow): it cannot be verified"
    recorded = json.loads(tags[tracking.ARTIFACT_DIGESTS_TAG])
    for uri in artifact_uris(record):
        if uri not in recorded:
            return f"artifact {uri} of run {record.run_id} has no recorded checksum"
        now = tracking.artifact_digest(tracking_config, uri)
        if now is None:
            return f"artifact {uri} of run {record.run_id} is missing"
        if now != recorded[uri]:
            return f"artifact {uri} of run {record.run_id} changed since the run finished (checksum mismatch)"
    return None
