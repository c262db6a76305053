"""Cluster deployment files and cluster-side config resolution: `ray_cluster.yaml` against the launcher schema that
ships inside the installed Ray, `deploy/rayjob.yaml` against what KubeRay's RayJob expects, storage and tracking
URIs that must reach every node unmangled, and the README's cluster commands."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipelines.config import CONFIG_DIR, STORAGE_PATH_ENV, config_from_mapping, load_config
from pipelines.ray_train import scaling_config

REPO = Path(__file__).resolve().parents[1]
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
CLUSTER_ENV = {"MLFLOW_TRACKING_URI", STORAGE_PATH_ENV, "RAY_AUTH_MODE"}


@pytest.fixture(scope="module")
def launcher_config() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((REPO / "deploy/rayjob.yaml").read_text())


def _docker_env(config: dict) -> dict[str, str]:
    env = {}
    for option in config["docker"]["run_options"]:
        if option.startswith("--env "):
            key, _, value = option.removeprefix("--env ").partition("=")
            env[key] = value
    return env


def test_ray_cluster_yaml_follows_the_installed_ray_launcher_schema(launcher_config: dict) -> None:
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(launcher_config, schema)
    # What `ray up` does with it: fill in the provider's defaults, then validate again (node types, worker counts).
    validate_config(prepare_config(copy.deepcopy(launcher_config)))
    broken = {**launcher_config, "head_node_typ": "head"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_ray_cluster_yaml_has_an_autoscaling_gpu_worker_on_aws(launcher_config: dict) -> None:
    assert launcher_config["provider"]["type"] == "aws"
    types = launcher_config["available_node_types"]
    assert launcher_config["head_node_type"] in types
    workers = {name: spec for name, spec in types.items() if name != launcher_config["head_node_type"]}
    gpu = workers["gpu_worker"]
    assert re.match(r"(g\d|p\d)", gpu["node_config"]["InstanceType"]), gpu["node_config"]["InstanceType"]
    assert 0 <= gpu["min_workers"] < gpu["max_workers"] <= launcher_config["max_workers"]
    assert "-gpu" in launcher_config["docker"]["image"]


def test_ray_cluster_yaml_installs_the_project_and_points_every_node_at_the_shared_services(
    launcher_config: dict,
) -> None:
    mounts = launcher_config["file_mounts"]
    project = next(remote for remote, local in mounts.items() if local == ".")
    assert any(f"pip install -q -e {project}" in command for command in launcher_config["setup_commands"])
    assert "~/.ray/auth_token" in mounts.values()  # token authentication stays on; every node shares the token
    env = _docker_env(launcher_config)
    assert CLUSTER_ENV <= set(env)
    assert env["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    assert env[STORAGE_PATH_ENV].startswith(("s3://", "gs://"))
    assert env["RAY_AUTH_MODE"] == "token"


def _containers(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"], rayjob["spec"]["submitterPodTemplate"]]
    pods += [group["template"] for group in cluster["workerGroupSpecs"]]
    return [container for pod in pods for container in pod["spec"]["containers"]]


def test_rayjob_has_the_fields_kuberay_expects(rayjob: dict) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    program, command, config_path = spec["entrypoint"].split()
    assert (program, command) == ("sslflow", "run") and (REPO / config_path).is_file()
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    assert isinstance(groups, list) and groups
    for params in [head["rayStartParams"], *(group["rayStartParams"] for group in groups)]:
        assert all(isinstance(value, str) for value in params.values()), params  # KubeRay: map[string]string
    for group in groups:
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    for container in _containers(rayjob):
        assert container["name"] and container["image"]
        env = {item["name"]: item for item in container["env"]}
        assert CLUSTER_ENV | {"RAY_AUTH_TOKEN"} <= set(env), container["name"]
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"]
        assert env[STORAGE_PATH_ENV]["value"].startswith(("s3://", "gs://"))


def test_cluster_config_takes_tracking_and_checkpoint_storage_from_the_node(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv(STORAGE_PATH_ENV, "s3://bucket/ray-train")
    cfg = load_config(CONFIG_DIR / "cluster.yaml")
    assert cfg.scaling.storage_path == "s3://bucket/ray-train"
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 2
    assert cfg.tracking.uri == "http://mlflow.internal:5000"
    assert cfg.tracking.artifact_location is None  # the server's artifact store, never a node's disk
    assert Path(cfg.data.path).is_absolute()


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://bucket/runs", "file:///mnt/shared/runs"])
def test_storage_uri_is_not_turned_into_a_local_path(tmp_path: Path, uri: str) -> None:
    cfg = config_from_mapping({"scaling": {"storage_path": uri}}, base=tmp_path)
    assert cfg.scaling.storage_path == uri
    # Resolution is idempotent: a stage re-validates the resolved dict on its worker.
    assert config_from_mapping(cfg.to_dict(), base=tmp_path / "elsewhere").scaling.storage_path == uri


def test_storage_path_explicit_beats_environment_beats_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(STORAGE_PATH_ENV, raising=False)
    assert config_from_mapping({}, base=tmp_path).scaling.storage_path == str(tmp_path / "sslflow_runs")
    monkeypatch.setenv(STORAGE_PATH_ENV, "gs://bucket/train")
    assert config_from_mapping({}, base=tmp_path).scaling.storage_path == "gs://bucket/train"
    explicit = config_from_mapping({"scaling": {"storage_path": "runs"}}, base=tmp_path)
    assert explicit.scaling.storage_path == str(tmp_path / "runs")


def test_tracking_server_keeps_artifacts_off_local_disks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = config_from_mapping({}, base=tmp_path).tracking
    assert local.uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and local.artifact_location == str(tmp_path / "mlartifacts")
    server = config_from_mapping({"tracking": {"uri": "https://mlflow.example.com"}}, base=tmp_path).tracking
    assert server.artifact_location is None
    bucket = {"uri": "https://mlflow.example.com", "artifact_location": "s3://bucket/mlflow"}
    assert config_from_mapping({"tracking": bucket}, base=tmp_path).tracking.artifact_location == "s3://bucket/mlflow"
    with pytest.raises(ValueError, match=r"tracking\.artifact_location='mlartifacts' is a local path"):
        config_from_mapping({"tracking": {"uri": "http://mlflow:5000", "artifact_location": "mlartifacts"}}, base=tmp_path)


def test_custom_resources_per_worker_reach_the_scaling_config(tmp_path: Path) -> None:
    cfg = config_from_mapping({"scaling": {"num_workers": 2, "cpus_per_worker": 0.5,
                                           "resources_per_worker": {"node_slot": 1}}}, base=tmp_path)
    assert scaling_config(cfg.scaling).resources_per_worker == {"node_slot": 1, "CPU": 0.5}
    for bad in ({"CPU": 2}, {"node_slot": -1}, {"node_slot": "one"}):
        with pytest.raises(ValueError, match=r"scaling\.resources_per_worker\."):
            config_from_mapping({"scaling": {"resources_per_worker": bad}}, base=tmp_path)


def test_readme_cluster_section_names_the_commands_and_files() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    for command in (
        "ray up ray_cluster.yaml",
        "ray job submit --working-dir . -- sslflow run pipelines/configs/cluster.yaml",
        "mlflow server --backend-store-uri postgresql://",
        "--artifacts-destination s3://",
        "--serve-artifacts",
        "RAY_AUTH_MODE=token",
        "deploy/rayjob.yaml",
        "tests/test_cluster.py",
    ):
        assert command in section, command


def test_logged_models_go_to_the_runs_experiment_store(tmp_path: Path, monkeypatch) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    from pipelines import tracking

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory's ./mlruns
    cfg = config_from_mapping({"tracking": {"uri": f"sqlite:///{tmp_path}/store/mlflow.db",
                                            "artifact_location": str(tmp_path / "store" / "artifacts")}}, base=tmp_path)
    run_id = tracking.start_run(cfg.tracking, "models")
    uri = tracking.log_torch_model(cfg.tracking, run_id, torch.nn.Linear(2, 2), "encoder", torch.zeros(1, 2))
    logged = MlflowClient(cfg.tracking.uri).get_logged_model(uri.removeprefix("models:/"))
    assert logged.experiment_id == MlflowClient(cfg.tracking.uri).get_run(run_id).info.experiment_id
    assert logged.source_run_id == run_id
    assert logged.artifact_location.startswith(str(tmp_path / "store" / "artifacts"))
    assert not (tmp_path / "mlruns").exists()
    assert isinstance(tracking.load_torch_model(cfg.tracking, uri), torch.nn.Linear)
    version = tracking.register_version(cfg.tracking, uri, "linear", {"test_top1": 0.5}, [tracking.CHALLENGER])
    assert tracking.model_version(cfg.tracking, "linear", version).run_id == run_id
