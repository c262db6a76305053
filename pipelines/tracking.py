"""The one module that talks to MLflow: experiments, nested stage runs, metrics, artifacts, models, registry.

Runs are addressed by id through ``MlflowClient`` so that the driver, Ray tasks and rank 0 of a Ray Train
worker group can all write into the same run without sharing MLflow's fluent "active run" state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric, Param, ViewType
from mlflow.tracking import MlflowClient

from pipelines.config import TrackingConfig
from pipelines.environment import environment_variable

logger = logging.getLogger(__name__)

STAGE_TAG = "sslflow.stage"
"""Which stage a run is (``ingest``, ..., ``pipeline`` for the parent run, ``tune_trial`` for a Tune trial)."""
FINGERPRINT_TAG = "sslflow.fingerprint"
UPSTREAM_TAG = "sslflow.upstream"
"""JSON ``{upstream stage: run id}`` of a stage run."""
PIPELINE_TAG = "sslflow.pipeline"
RECORD_TAG = "sslflow.record"
"""JSON of a finished stage's record (``pipelines.records``), read back when the stage is reused."""
REUSED_TAG_PREFIX = "sslflow.reused."
"""On a pipeline run: ``sslflow.reused.<stage>`` = the id of the earlier run it reused for that stage."""
TRIAL_TAG = "sslflow.trial_id"
TRIAL_STATE_TAG = "sslflow.trial_state"
TRIAL_ERROR_TAG = "sslflow.trial_error"
BEST_TRIAL_TAG = "sslflow.best_trial"
PROMOTION_TAG = "sslflow.promotion"
"""On a model version: why the promotion gate did or did not move the champion to it."""
NODE_TAG_PREFIX = "sslflow.node.rank"
PARENT_TAG = "mlflow.parentRunId"


def node_tag(rank: int) -> str:
    """Tag naming the Ray node id a Ray Train worker of ``rank`` ran on (``sslflow.node.rank0``, ...)."""
    return f"{NODE_TAG_PREFIX}{rank}"


def reused_tag(stage: str) -> str:
    return f"{REUSED_TAG_PREFIX}{stage}"


def stage_run_name(pipeline: str, stage: str) -> str:
    """The MLflow run name of a pipeline's run (``stage="pipeline"``) or of one of its stages:
    ``quickstart/pretrain``."""
    return f"{pipeline}/{stage}"


def nested_run_name(pipeline: str, stage: str, part: str) -> str:
    """The MLflow run name of a run nested in a stage's run: ``quickstart/finetune/0.1`` (a labeled fraction),
    ``quickstart/tune/trial-003`` (a Tune trial). Its last path component (``part``) tells it apart in its stage."""
    return f"{stage_run_name(pipeline, stage)}/{part}"


SYSTEM_METRICS_INTERVAL_SECONDS = 5.0
"""How often a training worker samples its machine (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides)."""


@contextmanager
def system_metrics(tracking: TrackingConfig, run_id: str | None, node_id: str) -> Iterator[None]:
    """MLflow's system metrics of this machine while the block runs: CPU and memory (psutil), disk, network, and
    GPU utilisation and memory when an NVIDIA GPU and ``pynvml`` are present, logged to ``run_id`` every
    ``SYSTEM_METRICS_INTERVAL_SECONDS`` as ``system/<node_id>/<name>`` (``node_id`` tells the workers apart), and
    once more when the block ends: the mean of the samples since the last log and one taken then. MLflow's monitor
    drops those on shutdown, so a block shorter than one interval would log nothing. Nothing without a run id."""
    if run_id is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_SECONDS, node_id=node_id,
                                   tracking_uri=tracking.uri, resume_logging=True)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as error:  # as MLflow's own monitor: a lost sample never fails the training run
            logger.warning("system metrics of %s: the last sample was not logged: %s", node_id, error)


def client_for(tracking: TrackingConfig) -> MlflowClient:
    mlflow.set_tracking_uri(tracking.uri)
    mlflow.set_registry_uri(tracking.uri)
    return MlflowClient(tracking_uri=tracking.uri, registry_uri=tracking.uri)


REACHABLE_TIMEOUT_SECONDS = 10.0
"""How long ``check_reachable`` waits for a tracking server to answer before calling it unreachable."""


class TrackingUnreachable(ConnectionError):
    """The tracking server of ``tracking.uri`` / ``$MLFLOW_TRACKING_URI`` does not answer."""


def check_reachable(tracking: TrackingConfig, timeout: float = REACHABLE_TIMEOUT_SECONDS) -> None:
    """Raise ``TrackingUnreachable`` naming the URI unless the tracking server answers an HTTP request within
    ``timeout`` seconds (any HTTP answer counts, even an error status: the server is there). Only ``http(s)://``
    URIs are probed; one request, no retries, so a command fails in seconds instead of after MLflow's retries."""
    import urllib.error
    import urllib.request

    uri = tracking.uri or ""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingUnreachable(f"the MLflow tracking server {uri} does not answer ({reason}); it is set by "
                                  "tracking.uri or $MLFLOW_TRACKING_URI") from None


def store_exists(tracking: TrackingConfig) -> bool:
    """Whether the tracking store holds anything yet: False for a ``sqlite:///`` file that does not exist (reading it
    through MLflow would create it), True for every other store. Lets a dry run, ``ls`` and ``promote`` write
    nothing."""
    uri = tracking.uri or ""
    if not uri.startswith("sqlite:///"):
        return True
    return Path(uri.removeprefix("sqlite:///")).exists() if uri != "sqlite:///:memory:" else True


def ensure_experiment(tracking: TrackingConfig) -> str:
    """Id of the configured experiment, created (with its artifact location) if missing. Call from the driver."""
    client = client_for(tracking)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    if tracking.artifact_location and "://" not in tracking.artifact_location:
        Path(tracking.artifact_location).mkdir(parents=True, exist_ok=True)
    experiment_id = client.create_experiment(tracking.experiment, artifact_location=tracking.artifact_location)
    _hide_empty_default_experiment(client, tracking.experiment)
    return experiment_id


def _hide_empty_default_experiment(client: MlflowClient, ours: str) -> None:
    """A new SQL store starts with an experiment ``Default`` that sslflow never uses: deleted (MLflow keeps it,
    hidden from the UI) when it holds no runs, so the UI opens on ours."""
    default = client.get_experiment_by_name("Default")
    if ours == "Default" or default is None or default.lifecycle_stage != "active":
        return
    if not client.search_runs([default.experiment_id], max_results=1, run_view_type=ViewType.ALL):
        client.delete_experiment(default.experiment_id)


def start_run(
    tracking: TrackingConfig,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a RUNNING run (nested under ``parent_run_id`` when given); returns its id."""
    client = client_for(tracking)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(ensure_experiment(tracking), run_name=run_name, tags=all_tags)
    return run.info.run_id


@contextmanager
def run(
    tracking: TrackingConfig,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> Iterator[str]:
    """A run around a block: yields its id, ends FINISHED on success, FAILED (KILLED on Ctrl-C) on an error."""
    run_id = start_run(tracking, run_name, tags, parent_run_id)
    try:
        if params:
            log_params(tracking, run_id, params)
        yield run_id
    except BaseException as error:
        end_run(tracking, run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    end_run(tracking, run_id, "FINISHED")


def end_run(tracking: TrackingConfig, run_id: str, status: str = "FINISHED") -> None:
    client_for(tracking).set_terminated(run_id, status=status)


def set_tags(tracking: TrackingConfig, run_id: str, tags: Mapping[str, Any]) -> None:
    client = client_for(tracking)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": value}`` (MLflow param names)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_params(tracking: TrackingConfig, run_id: str, params: Mapping[str, Any]) -> None:
    flat = flatten(params)
    items = [Param(key, str(value)[:6000]) for key, value in flat.items()]
    client = client_for(tracking)
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(
    tracking: TrackingConfig, run_id: str, rows: Iterable[tuple[int, Mapping[str, float]]]
) -> None:
    """Log ``(step, {name: value})`` rows in batches; non-finite values are logged as NaN."""
    import time

    now = int(time.time() * 1000)
    metrics = [
        Metric(name, float(value) if math.isfinite(float(value)) else float("nan"), now, step)
        for step, values in rows
        for name, value in values.items()
    ]
    client = client_for(tracking)
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start : start + 500])


def log_artifact(tracking: TrackingConfig, run_id: str, path: str | Path, artifact_path: str | None = None) -> str:
    """Upload a file; returns its ``runs:/`` URI."""
    client_for(tracking).log_artifact(run_id, str(path), artifact_path)
    name = Path(path).name
    return f"runs:/{run_id}/{artifact_path + '/' if artifact_path else ''}{name}"


def log_json(tracking: TrackingConfig, run_id: str, payload: Any, file_name: str) -> str:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / file_name
        path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
        return log_artifact(tracking, run_id, path)


def log_torch_model(
    tracking: TrackingConfig, run_id: str, model: torch.nn.Module, name: str, input_example: torch.Tensor
) -> str:
    """Log a CPU, eval-mode copy of ``model`` (pickled, so it loads back as its own class) with an input example;
    the caller's model is left where and as it is. Returns the model URI."""
    import copy

    client = client_for(tracking)
    model = copy.deepcopy(model).to("cpu").to(memory_format=torch.contiguous_format).eval()
    # The logged model belongs to the run's experiment, so its files go to that experiment's artifact store (the
    # configured one, or the tracking server's); left to MLflow it lands in the Default experiment, whose store is
    # ./mlruns in the logging process's working directory with a SQLite backend.
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    info = mlflow.pytorch.log_model(
        model,
        name=name,
        serialization_format="pickle",
        input_example=input_example.cpu().numpy(),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        run_id=run_id,
        model_id=logged.model_id,
    )
    return info.model_uri


def log_pyfunc_model(
    tracking: TrackingConfig, run_id: str, name: str, *, loader_module: str, data_path: str | Path,
    code_paths: list[str], signature: Any, input_example: Any, pip_requirements: list[str],
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Log a ``python_function`` model loaded by ``loader_module._load_pyfunc(<model>/data/<data_path name>)`` with
    ``code_paths`` shipped inside it, into ``run_id``'s experiment (see ``log_torch_model``). Returns the model URI."""
    client = client_for(tracking)
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    # mlflow.pyfunc.log_model writes to the fluent active run; Model.log takes the run id (as mlflow.pytorch does).
    info = mlflow.models.Model.log(
        artifact_path=None, flavor=mlflow.pyfunc, name=name, loader_module=loader_module, data_path=str(data_path),
        code_paths=code_paths, signature=signature, input_example=input_example, pip_requirements=pip_requirements,
        metadata=dict(metadata or {}), run_id=run_id, model_id=logged.model_id,
    )
    return info.model_uri


def describe_registered_model(tracking: TrackingConfig, name: str, model_description: str, version: str,
                              version_description: str) -> None:
    """Set the descriptions of the registered model ``name`` and of its ``version``."""
    client = client_for(tracking)
    client.update_registered_model(name, description=model_description)
    client.update_model_version(name, str(version), description=version_description)


def load_torch_model(tracking: TrackingConfig, model_uri: str) -> torch.nn.Module:
    client_for(tracking)
    return mlflow.pytorch.load_model(model_uri, map_location="cpu")


def download_artifact(tracking: TrackingConfig, artifact_uri: str, destination: str | Path) -> Path:
    client_for(tracking)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(destination)))


def get_run(tracking: TrackingConfig, run_id: str):
    """The MLflow ``Run`` (info, params, latest metrics, tags); raises ``ValueError`` naming an unknown id."""
    try:
        return client_for(tracking).get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        raise ValueError(f"no MLflow run {run_id!r} in {tracking.uri}") from error


def metric_history(tracking: TrackingConfig, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every logged value of ``key``, by step."""
    return sorted((m.step, m.value) for m in client_for(tracking).get_metric_history(run_id, key))


def list_artifacts(tracking: TrackingConfig, run_id: str, path: str | None = None) -> list[tuple[str, int]]:
    """``(path, size in bytes)`` of every artifact file of the run under ``path``, depth first."""
    client = client_for(tracking)
    files: list[tuple[str, int]] = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            files.extend(list_artifacts(tracking, run_id, item.path))
        else:
            files.append((item.path, item.file_size or 0))
    return files


def model_versions_of_runs(tracking: TrackingConfig, run_ids: Iterable[str]) -> list:
    """The registered ``ModelVersion`` s whose source run is one of ``run_ids``."""
    client = client_for(tracking)
    versions = []
    for run_id in run_ids:
        versions.extend(client.search_model_versions(f"run_id = '{run_id}'"))
    return versions


def parent_run_id(tracking: TrackingConfig, run_id: str) -> str | None:
    """The id of the run ``run_id`` is nested under (a stage's pipeline run), or None."""
    return client_for(tracking).get_run(run_id).data.tags.get(PARENT_TAG)


# ----------------------------------------------------------------------------------------- stage reuse (resume)


def find_finished_stage(tracking: TrackingConfig, stage: str, fingerprint: str) -> dict[str, Any] | None:
    """The record of the newest FINISHED run of ``stage`` with ``fingerprint``, or None (also when the store does not
    exist yet: ``store_exists``)."""
    if not store_exists(tracking):
        return None
    client = client_for(tracking)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs or RECORD_TAG not in runs[0].data.tags:
        return None
    return json.loads(runs[0].data.tags[RECORD_TAG])


ARTIFACT_DIGESTS_TAG = "sslflow.artifact_digests"
"""On a finished stage run: JSON ``{artifact URI: artifact_digest}`` of the artifacts its record names."""


def artifact_digest(tracking: TrackingConfig, artifact_uri: str) -> str | None:
    """sha256 over the relative path and content of every file of the artifact ``artifact_uri`` (``runs:/...`` file
    or folder, ``models:/<model id>``), downloaded to a temporary folder; None when it is missing or empty."""
    import hashlib

    client_for(tracking)
    # MLflow's download progress bar off: a plan's checksums would print one per artifact
    with tempfile.TemporaryDirectory() as directory, \
            environment_variable("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=directory))
        except (mlflow.exceptions.MlflowException, OSError):
            return None
        files = [local] if local.is_file() else sorted(path for path in local.rglob("*") if path.is_file())
        if not files:
            return None
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.relative_to(local).as_posix()}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.hexdigest()


def search_runs(tracking: TrackingConfig, filter_string: str, max_results: int = 100) -> list:
    if not store_exists(tracking):
        return []
    client = client_for(tracking)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


DEAD_ATTEMPT_TAG = "sslflow.dead_attempt"


def fail_dead_attempts(tracking: TrackingConfig, stage: str, pipeline_run_id: str) -> list[str]:
    """Mark FAILED every RUNNING run of ``stage`` under the pipeline run ``pipeline_run_id``, and return their ids.

    Within one pipeline run a stage runs once, so when its stage task starts, a RUNNING run of it under the same
    parent is an attempt whose Ray worker died (OOM-killed, lost node) and that Ray retried: it is left RUNNING
    otherwise, forever."""
    dead = search_runs(tracking, f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{PARENT_TAG}` = '{pipeline_run_id}' "
                                 "and attributes.status = 'RUNNING'")
    for run in dead:
        set_tags(tracking, run.info.run_id, {DEAD_ATTEMPT_TAG: "its Ray task died and Ray retried the stage"})
        end_run(tracking, run.info.run_id, "FAILED")
    return [run.info.run_id for run in dead]


# ------------------------------------------------------------------------------------------- model registry

CHAMPION = "champion"
CHALLENGER = "challenger"


def register_version(
    tracking: TrackingConfig, model_uri: str, name: str, tags: Mapping[str, Any], aliases: Iterable[str] = ()
) -> str:
    """Register ``model_uri`` as a new version of ``name`` with ``tags`` and ``aliases``; returns the version.

    All or nothing: if tagging or aliasing fails, the new version is deleted before the error propagates.
    """
    client = client_for(tracking)
    ensure_registered_model(client, name)
    # A logged model's URI (models:/<model_id>) must name its model_id, or a tracking server refuses the version.
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
    if model_id is not None and "/" in model_id:
        model_id = None  # models:/<registered name>/<version or @alias>, not a logged model
    run_id = client.get_logged_model(model_id).source_run_id if model_id is not None else None
    version = client.create_model_version(name, model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                          model_id=model_id)
    try:
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version.version)
    except Exception:
        client.delete_model_version(name, version.version)
        raise
    return str(version.version)


def is_missing(error: mlflow.exceptions.MlflowException) -> bool:
    """Whether a registry ``error`` says that a registered model, version or alias does not exist.

    What MLflow 3.17 raises, from a SQL store and over REST alike: ``RESOURCE_DOES_NOT_EXIST`` for a missing model
    or version, ``INVALID_PARAMETER_VALUE`` with "Registered model alias <alias> not found." for a missing alias.
    Anything else (a server answering 5xx, an unreachable server, a broken store) is not "missing"."""
    if error.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    message = str(error.message)
    return error.error_code == "INVALID_PARAMETER_VALUE" and "alias" in message and "not found" in message


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model ``name`` unless it exists; a concurrent creator winning the race is fine."""
    try:
        client.get_registered_model(name)
        return
    except mlflow.exceptions.MlflowException as error:
        if not is_missing(error):
            raise
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def version_for_alias(tracking: TrackingConfig, name: str, alias: str):
    """The ``ModelVersion`` behind ``name@alias``; None only if the model or the alias does not exist
    (``is_missing``). Any other registry error propagates: a transient error must never read as "no champion"."""
    client = client_for(tracking)
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as error:
        if is_missing(error):
            return None
        raise


REGISTRY_LOCK_SUFFIX = ".promotion-lock"
"""The lock of ``promote`` on ``<name>`` is the registered model ``<name>.promotion-lock`` (``registry_lock``)."""
REGISTRY_LOCK_STALE_SECONDS = 60.0


@contextmanager
def registry_lock(tracking: TrackingConfig, name: str, *, stale_after: float = REGISTRY_LOCK_STALE_SECONDS,
                  poll_seconds: float = 0.05) -> Iterator[None]:
    """Hold the promotion lock of the registered model ``name`` while the block runs: at most one holder at a time
    among every process and machine that shares the registry.

    The lock is the registered model ``<name>`` + ``REGISTRY_LOCK_SUFFIX``. Creating a registered model is atomic
    (the store refuses a second one with ``RESOURCE_ALREADY_EXISTS``), so exactly one of several concurrent creators
    holds it; the holder deletes it on exit. A refused creation can also come back as ``RESOURCE_DOES_NOT_EXIST``
    (MLflow's SQL store reads the existing model back to word its refusal, and the holder may have deleted it in
    between): the lock was just released, so the creator tries again. A waiter polls every ``poll_seconds`` (with
    jitter). A lock whose holder died stays behind: a waiter that has seen the same lock (same creation timestamp)
    for ``stale_after`` seconds of its own clock deletes it, says so on stderr, and competes again. (Two waiters
    breaking the same stale lock at once could both get in; a promotion takes well under ``stale_after``.)"""
    client = client_for(tracking)
    lock_name = f"{name}{REGISTRY_LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}"
    seen: tuple[int | None, float] | None = None  # (creation timestamp of the lock we wait on, when first seen)
    while True:
        try:
            client.create_registered_model(lock_name, description=f"sslflow promotion lock of {name}, held by "
                                                                  f"{holder}; deleted when its promotion ends")
            break
        except mlflow.exceptions.MlflowException as error:
            if is_missing(error):  # the SQL store found a lock, then failed to read it back: released meanwhile
                continue
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            created = client.get_registered_model(lock_name).creation_timestamp
        except mlflow.exceptions.MlflowException as error:
            if not is_missing(error):
                raise
            continue  # released meanwhile: try again now
        if seen is None or seen[0] != created:
            seen = (created, time.monotonic())
        elif time.monotonic() - seen[1] >= stale_after:
            print(f"[sslflow] breaking the promotion lock {lock_name!r} (unchanged for {stale_after:g} s: its holder "
                  "died)", file=sys.stderr, flush=True)
            try:
                client.delete_registered_model(lock_name)
            except mlflow.exceptions.MlflowException as error:
                if not is_missing(error):
                    raise
            seen = None
            continue
        time.sleep(poll_seconds * (0.5 + random.random()))
    try:
        yield
    finally:
        client.delete_registered_model(lock_name)


def check_model_version(tracking: TrackingConfig, name: str, version: str) -> None:
    """``ValueError`` naming what does not exist unless the registry holds version ``version`` of the registered model
    ``name``; reads only (an empty folder's tracking store is not created: ``store_exists``)."""
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"model version {version!r} is not a version number (1, 2, ...)")
    if not store_exists(tracking):
        raise ValueError(f"no registered model {name!r}: the tracking store {tracking.uri} does not exist yet")
    client = client_for(tracking)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as error:
        if not is_missing(error):
            raise
        raise ValueError(f"no registered model {name!r} in {tracking.uri}") from None
    try:
        client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as error:
        if not is_missing(error):
            raise
        versions = sorted(int(found.version) for found in client.search_model_versions(f"name = '{name}'"))
        raise ValueError(f"registered model {name!r} has no version {version} (its versions: "
                         f"{', '.join(map(str, versions)) or 'none'})") from None


def model_version(tracking: TrackingConfig, name: str, version: str):
    return client_for(tracking).get_model_version(name, str(version))


def set_alias(tracking: TrackingConfig, name: str, alias: str, version: str) -> None:
    client_for(tracking).set_registered_model_alias(name, alias, str(version))


def set_version_tag(tracking: TrackingConfig, name: str, version: str, key: str, value: Any) -> None:
    client_for(tracking).set_model_version_tag(name, str(version), key, str(value))
