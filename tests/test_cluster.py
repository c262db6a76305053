"""The pipeline on a real two-node Ray cluster with a real MLflow tracking server, all on this machine, no mocks.

The commands are the README's "Run on a cluster" ones: `mlflow server --serve-artifacts`, `ray start --head`,
`ray start --address` (a second node with its own resources), `ray job submit --working-dir REPO -- sslflow run
CONFIG`, with token authentication on (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN`). Every node gets
`MLFLOW_TRACKING_URI` and `SSLFLOW_STORAGE_PATH` in its environment, as `ray_cluster.yaml` sets them.

Both Ray Train workers request one `sslflow_train_slot`, which each node has once, so rank 0 and rank 1 run on
different nodes; the pretrain run's `sslflow.node.rank*` tags show where. Both workers are parked at the start of
pretrain's epoch 2 (after epoch 1's checkpoint) by the test fault `pretrain_hold_at_epoch` (`SSLFLOW_FAULTS`, given
to job 1 only, in its runtime env); the second node's raylet is then killed (SIGKILL, by pid) and a replacement node
joins, as an autoscaler would start one. The job must recover through Ray Train's `FailureConfig` (max_failures 3:
the restarted worker group waits for the replacement's slot), resuming from epoch 1's checkpoint, and finish.
A rerun reuses every stage. Every process is torn down by pid, also when the test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines import faults, tracking

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SLOT = "sslflow_train_slot"
"""Custom resource every node has once and every Train worker asks one of: one worker per node."""
EXPERIMENT = "sslflow"
PIPELINE_STAGES = {"ingest", "pretrain", "evaluate", "finetune", "distill", "register", "promote"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ..., start time at index 19); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """With the pid, identifies a process (pids are reused); None for a process that is gone or a zombie."""
    fields = _stat(pid)
    return None if fields is None or fields[0] == "Z" else int(fields[19])


def _parent_pids() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(entry)) is not None:
            parents[int(entry)] = int(fields[1])
    return parents


def _descendants(pid: int) -> set[int]:
    parents = _parent_pids()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _wait(what: str, condition: Callable[[], object], timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class LocalCluster:
    """A Ray head, worker nodes and an MLflow server as separate processes, each node with its own temp dir.

    Everything this class starts is recorded; ``teardown`` ends exactly those processes and their descendants,
    plus any process whose command line names this cluster's private directory (Ray workers whose raylet died).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = secrets.token_hex(32)
        self.processes: dict[str, subprocess.Popen] = {}
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.mlflow_uri = f"http://127.0.0.1:{_free_port()}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.storage_path = root / "shared" / "train_runs"
        base = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "MLFLOW_", "SSLFLOW_"))}
        self.env = {
            **base,
            "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "SSLFLOW_STORAGE_PATH": str(self.storage_path),
        }

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        process = subprocess.Popen(args, env={**self.env, **(env or {})}, cwd=self.root, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def _wait_started(self, name: str, timeout: float = 180) -> None:
        process = self.processes[name]

        def started() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log(name)[-4000:]}")
            return "Ray runtime started" in self.log(name)

        _wait(f"{name} to start", started, timeout)

    def start_mlflow(self) -> None:
        port = self.mlflow_uri.rsplit(":", 1)[1]
        self.spawn("mlflow", [
            str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
            "--artifacts-destination", str(self.root / "mlartifacts"), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", port, "--workers", "1",
        ])

    def wait_mlflow(self, timeout: float = 180) -> None:
        def healthy() -> bool:
            if self.processes["mlflow"].poll() is not None:
                raise AssertionError(f"mlflow server exited:\n{self.log('mlflow')[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        _wait("the MLflow server", healthy, timeout)

    def _node_env(self) -> dict[str, str]:
        # Ray processes that look the cluster up (Ray Train's placement group cleaner) would otherwise find this
        # machine's other Ray instances too and refuse to choose.
        # No drain wait on SIGTERM at teardown (a Serve feature).
        return {"RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}

    def _node_args(self, name: str, resources: dict[str, float]) -> list[str]:
        return [
            "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
            "--resources", json.dumps(resources), "--temp-dir", str(self.root / name),
            "--object-store-memory", str(150 * 1024**2), "--disable-usage-stats",
            "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
        ]

    def start_head(self) -> None:
        self.spawn("head", [
            str(BIN / "ray"), "start", "--head", "--port", str(self.gcs_port),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(_free_port()),
            *self._node_args("head", {SLOT: 1, "sslflow_node_head": 1}),
        ], self._node_env())

    def start_worker(self, name: str) -> None:
        self.spawn(name, [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{self.gcs_port}",
                          *self._node_args(name, {SLOT: 1, f"sslflow_node_{name}": 1})], self._node_env())

    def wait_nodes(self, *names: str) -> None:
        for name in names:
            self._wait_started(name)

    def alive_nodes(self) -> dict[str, str]:
        """``{node name: node id}`` of the ALIVE nodes, from the ``sslflow_node_<name>`` resource of each."""
        result = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", self.dashboard, "--format", "json",
                                 "--filter", "state=ALIVE"], env=self.env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        nodes = {}
        for node in json.loads(result.stdout):
            for resource in node["resources_total"]:
                if resource.startswith("sslflow_node_"):
                    nodes[resource.removeprefix("sslflow_node_")] = node["node_id"]
        return nodes

    def submit(self, name: str, config_path: Path, env_vars: dict[str, str] | None = None) -> subprocess.Popen:
        """`ray job submit` (blocking, tailing the driver's output into ``<name>.log``) in the background;
        ``env_vars`` go into the job's runtime env."""
        runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
        return self.spawn(name, [
            str(BIN / "ray"), "job", "submit", "--address", self.dashboard,
            "--submission-id", f"{name}-{secrets.token_hex(4)}", *runtime_env,
            "--working-dir", str(REPO), "--", "sslflow", "run", str(config_path),
        ])

    def raylet_pid(self, name: str) -> int:
        assert self.processes[name].poll() is None, f"node {name} is not running"
        raylets = [pid for pid in _descendants(self.processes[name].pid) if _cmdline(pid)[0].endswith("/raylet")]
        assert len(raylets) == 1, f"expected one raylet under {name}, found {raylets}"
        return raylets[0]

    def owned(self) -> dict[int, int]:
        """``{pid: start time}`` of the live processes started here: the spawned ones still running, their
        descendants, and any process whose command line names this cluster's directory."""
        pids = set()
        for process in self.processes.values():
            if process.poll() is None:
                pids |= {process.pid} | _descendants(process.pid)
        marker = str(self.root)
        pids |= {pid for pid in _parent_pids() if pid != os.getpid() and any(marker in arg for arg in _cmdline(pid))}
        return {pid: start for pid in pids if (start := _start_time(pid)) is not None}

    def teardown(self) -> dict[int, int]:
        """SIGTERM every spawned process (``ray start --block`` then stops its node's processes), SIGKILL whatever
        is left (only if its pid still names the same process); returns what is still running after 10 s."""
        owned = self.owned()
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        owned.update(self.owned())
        for pid, start in owned.items():
            if _start_time(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while (left := {pid: start for pid, start in owned.items() if _start_time(pid) == start} | self.owned()):
            if time.monotonic() > deadline:
                return left
            time.sleep(0.5)
        return {}


def cluster_config(cluster: LocalCluster, data_path: str) -> dict:
    """The quickstart pipeline, shrunk, with two Train workers (one per node) and no tracking/storage keys:
    those come from the nodes' MLFLOW_TRACKING_URI and SSLFLOW_STORAGE_PATH, as on a real cluster. ``data_path``:
    an object-store URI every node reads with the AWS_* variables of its environment (conftest's ``S3_ENV``)."""
    values = yaml.safe_load((REPO / "pipelines/configs/quickstart.yaml").read_text())
    values["name"] = "cluster-test"
    values.pop("tracking", None)
    values["data"]["path"] = data_path
    values["method"]["config"].update(backbone="resnet8", projection_hidden_dim=32, projection_dim=16)
    values["scaling"] = {"num_workers": 2, "cpus_per_worker": 0.5, "resources_per_worker": {SLOT: 1},
                         "max_failures": 3}
    values["pretrain"].update(epochs=2, knn_every=2, knn_bank_size=500, checkpoint_every=1, log_every_steps=1)
    values["evaluate"].update(linear_probe_epochs=5)
    values["finetune"].update(epochs=1)
    values["distill"].update(epochs=1)
    values["registry"]["model_name"] = "sslflow-cluster-test"
    return values


def _runs(client: MlflowClient, filter_string: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string, order_by=["attributes.start_time ASC"])


def _stage_runs(client: MlflowClient, parent_run_id: str) -> dict:
    return {run.data.tags[tracking.STAGE_TAG]: run
            for run in _runs(client, f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'")}


def _finish(process: subprocess.Popen, timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"ray job submit still running after {timeout:.0f} s") from None


def test_pipeline_on_two_node_cluster_with_mlflow_server_survives_a_lost_node(record_property, tmp_path: Path,
                                                                             s3_server) -> None:
    started = time.monotonic()

    def note(message: str) -> None:
        print(f"[{time.monotonic() - started:5.0f} s] {message}", flush=True)

    # Short root: Ray's unix socket paths live under each node's temp dir and must stay under 108 characters.
    root = Path(tempfile.mkdtemp(prefix="sslc-", dir="/tmp"))
    cluster = LocalCluster(root)
    try:
        cluster.start_mlflow()
        cluster.start_head()
        cluster.wait_nodes("head")
        cluster.start_worker("b")
        cluster.wait_mlflow()
        config_path = root / "cluster.yaml"
        data_path = f"{s3_server.bucket('sslflow-cluster')}/digits"  # the data lives in S3, not on a shared disk
        config_path.write_text(yaml.safe_dump(cluster_config(cluster, data_path)))
        # The registry URI explicitly too: MlflowClient takes it from mlflow's process-wide default otherwise.
        client = MlflowClient(tracking_uri=cluster.mlflow_uri, registry_uri=cluster.mlflow_uri)

        # Run 1: kill node b's raylet while pretrain's workers (one on each node) hold after epoch 1's checkpoint.
        once_dir = root / "faults"
        first = cluster.submit("job1", config_path, {  # Train waits for node b's slot if the job gets there first
            faults.FAULTS_ENV: json.dumps({"pretrain_hold_at_epoch": 2, "once_dir": str(once_dir)})})
        cluster.wait_nodes("b")
        nodes = cluster.alive_nodes()
        note(f"cluster up: {nodes}, MLflow server {cluster.mlflow_uri}; job 1 submitted")
        assert set(nodes) == {"head", "b"}, nodes

        def pretrain_mid_way():
            if first.poll() is not None:
                raise AssertionError(f"job 1 ended before pretrain was interrupted:\n{cluster.log('job1')[-6000:]}")
            if len(list(once_dir.glob("pretrain-*.hold.epoch.rank*"))) < 2:
                return None  # not both workers parked after epoch 1's checkpoint yet
            runs = _runs(client, f"tags.`{tracking.STAGE_TAG}` = 'pretrain' and attributes.status = 'RUNNING'")
            if runs and {tracking.node_tag(0), tracking.node_tag(1)} <= set(runs[0].data.tags):
                return runs[0]
            return None

        pretrain = _wait("pretrain's workers to hold at epoch 2", pretrain_mid_way, timeout=240, interval=0.25)
        placement = {rank: pretrain.data.tags[tracking.node_tag(rank)] for rank in (0, 1)}
        assert set(placement.values()) == {nodes["head"], nodes["b"]}, (placement, nodes)
        os.kill(cluster.raylet_pid("b"), signal.SIGKILL)
        killed_at = time.monotonic() - started
        note(f"pretrain holding at epoch 2 on nodes {placement}: killed node b's raylet")
        cluster.start_worker("b2")  # the replacement node an autoscaler would start
        cluster.wait_nodes("b2")
        note("replacement node b2 joined")
        first_code = _finish(first, timeout=300)
        note(f"job 1 ended with {first_code}")
        assert first_code == 0, f"job 1 did not recover from the lost node:\n{cluster.log('job1')[-6000:]}"
        parents = _runs(client, f"tags.`{tracking.STAGE_TAG}` = 'pipeline'")
        assert len(parents) == 1
        pretrain = client.get_run(pretrain.info.run_id)
        assert pretrain.info.status == "FINISHED"
        resumed = [m.value for m in client.get_metric_history(pretrain.info.run_id, "resumed_from_epoch")]
        assert resumed == [1.0], resumed  # the restarted group went on from epoch 1's checkpoint
        after = {rank: pretrain.data.tags[tracking.node_tag(rank)] for rank in (0, 1)}
        assert nodes["b"] not in after.values(), (after, nodes)  # the replacement node took the lost one's place
        record_property("raylet_kill_outcome", f"recovered, resumed_from_epoch={resumed}")
        note(f"killed node b's raylet at {killed_at:.0f} s: job 1 recovered, resumed_from_epoch={resumed}")

        # Run 2: the same pipeline again reuses what finished.
        second = cluster.submit("job2", config_path)
        assert _finish(second, timeout=300) == 0, cluster.log("job2")[-6000:]
        note("job 2 succeeded")
        parents = _runs(client, f"tags.`{tracking.STAGE_TAG}` = 'pipeline'")
        assert [run.info.status for run in parents] == ["FINISHED", "FINISHED"]
        rerun = parents[1]
        reused = {key.removeprefix(tracking.REUSED_TAG_PREFIX): value for key, value in rerun.data.tags.items()
                  if key.startswith(tracking.REUSED_TAG_PREFIX)}
        expected_reuse = PIPELINE_STAGES - {"promote"}
        assert set(reused) >= expected_reuse, reused
        note(f"rerun reused: {sorted(reused)}")

        # Everything is on the server: stage runs, artifacts through the server's artifact store, the registry.
        stage_run_ids = {stage: run.info.run_id for stage, run in _stage_runs(client, rerun.info.run_id).items()}
        stage_run_ids.update(reused)
        assert set(stage_run_ids) >= PIPELINE_STAGES, stage_run_ids
        stages = {stage: client.get_run(run_id) for stage, run_id in stage_run_ids.items()}
        statuses = {stage: run.info.status for stage, run in stages.items()}
        assert set(statuses.values()) == {"FINISHED"}, statuses
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
        assert all(run.info.artifact_uri.startswith("mlflow-artifacts:") for run in stages.values())
        store = root / "mlartifacts" / experiment.experiment_id  # the server's --artifacts-destination
        pretrain_run = stages["pretrain"].info.run_id
        assert [item.path for item in client.list_artifacts(pretrain_run)] == ["checkpoints"]
        assert (store / pretrain_run / "artifacts" / "checkpoints" / "checkpoint.pt").is_file()
        encoder_uri = json.loads(stages["pretrain"].data.tags[tracking.RECORD_TAG])["encoder_uri"]
        encoder_id = encoder_uri.removeprefix("models:/")
        encoder = client.get_logged_model(encoder_id)
        assert encoder.source_run_id == pretrain_run and encoder.artifact_location.startswith("mlflow-artifacts:")
        assert [path for path in store.rglob("MLmodel") if encoder_id in str(path)], f"{encoder_id} not in {store}"
        champion = client.get_model_version_by_alias("sslflow-cluster-test", "champion")
        assert champion.tags["pipeline_run_id"] == parents[0].info.run_id
        # the served model is logged by the register run, from the distill run's student
        assert champion.run_id == stages["register"].info.run_id and champion.source.startswith("models:/m-")
        assert champion.tags["source_model_uri"] == json.loads(stages["distill"].data.tags[tracking.RECORD_TAG])[
            "model_uri"]
        champion_id = champion.source.removeprefix("models:/")
        assert [path for path in store.rglob("MLmodel") if champion_id in str(path)], champion_id
        note("all checks passed")
    finally:
        note("tearing down")
        leftover = cluster.teardown()
        note("torn down")
        for kept in [*root.glob("*.log"), root / "mlflow.db"]:  # kept in the test's tmp_path for a post-mortem
            if kept.is_file():
                shutil.copy(kept, tmp_path / kept.name)
        shutil.rmtree(root, ignore_errors=True)
    assert not leftover, f"processes left running: {leftover}"
