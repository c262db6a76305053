"""Promotion that is never wrong, against a real ``mlflow server`` (one per file): the gate compares ``val_top1``
and only reports ``test_top1``; models trained on different data are not compared; a registry error fails the
promotion instead of reading as "no champion"; two promoters at once end with the better champion and a consistent
``previous_champion``. Plus the shared pipeline run: what it registers and how promote decided.

Versions are registered directly (a run and a source URI, no model files): promotion reads only tags and aliases.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.config import TrackingConfig
from pipelines.datasets import load_split_tensors, read_manifest
from pipelines.knn_monitor import pretrain_splits
from pipelines.stages.promote import PREVIOUS_CHAMPION, promote, promotion_decision

ROOT = Path(__file__).resolve().parents[1]
HASH = "sha256:aaaa"
ALIAS_PATH = "/api/2.0/mlflow/registered-models/alias"


PROMOTER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from pipelines import tracking
    from pipelines.config import TrackingConfig
    from pipelines.stages.promote import promote

    barrier = Path(sys.argv[1])
    while not (barrier / "job.json").exists():
        time.sleep(0.05)
    url, name, me, other, plan = json.loads((barrier / "job.json").read_text())
    set_alias, delay = tracking.set_alias, [0.0]

    def slow_set_alias(*args):  # widen the read-decide-write window: without the lock the race always shows
        time.sleep(delay[0])
        set_alias(*args)

    def meet(path):
        Path(barrier, path.format(me=me)).touch()
        while not Path(barrier, path.format(me=other)).exists():
            time.sleep(0.002)

    tracking.set_alias = slow_set_alias
    config = TrackingConfig(uri=url, experiment="promotion")
    tracking.version_for_alias(config, name, "champion")  # warm up (client, connection) before the first round
    for index, (version, seconds) in enumerate(plan):  # [[version, delay before its alias writes], ...]
        delay[0] = seconds
        meet(f"{index}-{{me}}")
        decision = promote(config, name, version, margin=0.0)
        Path(barrier, f"{index}-{me}.json").write_text(json.dumps(decision))
        meet(f"{index}-{{me}}.done")
""")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def promoter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path]]:
    """The second promoter of ``test_two_promoters_at_once_end_with_the_better_champion``: a process running
    ``PROMOTER`` and its barrier folder; it imports sslflow, then waits for ``job.json`` there."""
    barrier = tmp_path_factory.mktemp("barrier")
    child = subprocess.Popen([sys.executable, "-c", PROMOTER, str(barrier)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "PYTHONPATH": str(ROOT)})
    yield child, barrier
    if child.poll() is None:
        child.kill()
        child.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, promoter) -> Iterator[str]:
    """A real ``mlflow server`` on a SQLite store (its job runner off: nothing here uses it). ``promoter`` starts
    first, so that its imports overlap the server's start-up."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(folder / "server.log", "w")  # noqa: SIM115 - open while the server runs
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"mlflow server did not start: {(folder / 'server.log').read_text()}")
                time.sleep(0.25)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        log.close()


@pytest.fixture(autouse=True)
def no_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error answer fails at once (MLflow's client retries 5xx for minutes by default)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


class Registry:
    """Registers versions of one model on the server with the tags promotion reads."""

    def __init__(self, url: str, name: str) -> None:
        self.config = TrackingConfig(uri=url, experiment="promotion")
        self.client = MlflowClient(url, registry_uri=url)  # not the process-wide registry URI an earlier test set
        self.name = name
        tracking.ensure_experiment(self.config)
        self.run_id = tracking.start_run(self.config, "models")

    def register(self, val: float | None, test: float, dataset_hash: str = HASH) -> str:
        tags = {"test_top1": test, "dataset_hash": dataset_hash, **({} if val is None else {"val_top1": val})}
        tracking.ensure_registered_model(self.client, self.name)
        version = self.client.create_model_version(self.name, f"runs:/{self.run_id}/model", run_id=self.run_id,
                                                   tags={key: str(value) for key, value in tags.items()})
        return str(version.version)

    def alias(self, alias: str) -> str | None:
        found = tracking.version_for_alias(self.config, self.name, alias)
        return None if found is None else str(found.version)

    def reason(self, version: str) -> str:
        return self.client.get_model_version(self.name, version).tags[tracking.PROMOTION_TAG]

    def lock_exists(self) -> bool:
        return bool(self.client.search_registered_models(f"name = '{self.name}{tracking.REGISTRY_LOCK_SUFFIX}'"))


def test_promotion_decision() -> None:
    assert promotion_decision(0.5, None, 0.0)[0]
    assert promotion_decision(0.8, 0.7, 0.05)[0]
    assert not promotion_decision(0.72, 0.7, 0.05)[0]
    assert not promotion_decision(0.7, 0.7, 0.0)[0]
    assert not promotion_decision(0.6, 0.7, 0.0)[0]


def test_the_gate_compares_val_top1_and_reports_test_top1(server: str) -> None:
    registry = Registry(server, "gate")
    first = registry.register(val=0.70, test=0.95)
    assert promote(registry.config, "gate", first, margin=0.01)["promoted"] and registry.alias("champion") == first
    # better on test, worse on val: stays out
    test_only = registry.register(val=0.65, test=0.99)
    decision = promote(registry.config, "gate", test_only, margin=0.01)
    assert not decision["promoted"] and decision["champion_version"] == first == registry.alias("champion")
    assert decision["reason"] == registry.reason(test_only) == (
        "candidate val_top1=0.6500 does not beat champion 0.7000 by 0.01 [candidate val_top1=0.6500 "
        f"(test_top1 0.9900); champion {first} val_top1=0.7000 (test_top1 0.9500)]")
    # worse on test, better on val by the margin: promoted; the replaced champion stays reachable
    val_better = registry.register(val=0.72, test=0.50)
    assert promote(registry.config, "gate", val_better, margin=0.01)["promoted"]
    assert (registry.alias("champion"), registry.alias(PREVIOUS_CHAMPION)) == (val_better, first)
    assert promote(registry.config, "gate", val_better, margin=0.01)["reason"] == "already champion"
    assert promote(registry.config, "gate", test_only, margin=0.01, force=True)["promoted"]
    assert (registry.alias("champion"), registry.alias(PREVIOUS_CHAMPION)) == (test_only, val_better)
    assert registry.reason(test_only).startswith("forced by a person (candidate val_top1=0.6500 does not beat")
    assert not registry.lock_exists()


def test_models_of_different_data_or_without_val_top1_are_not_compared_unless_forced(server: str) -> None:
    registry = Registry(server, "data")
    champion = registry.register(val=0.50, test=0.50, dataset_hash="sha256:old")
    assert promote(registry.config, "data", champion, margin=0.0)["promoted"]
    other_data = registry.register(val=0.90, test=0.90, dataset_hash="sha256:new")
    decision = promote(registry.config, "data", other_data, margin=0.0)
    assert not decision["promoted"] and registry.alias("champion") == champion
    assert decision["reason"] == (
        f"refused: candidate version {other_data} was trained on dataset sha256:new, champion version {champion} on "
        "dataset sha256:old: their val_top1 are not comparable; a person may promote it with --force")
    no_val = registry.register(val=None, test=0.99, dataset_hash="sha256:old")
    decision = promote(registry.config, "data", no_val, margin=0.0)
    assert not decision["promoted"] and f"candidate version {no_val} has no val_top1 tag" in decision["reason"]
    assert promote(registry.config, "data", other_data, margin=0.0, force=True)["promoted"]
    assert (registry.alias("champion"), registry.alias(PREVIOUS_CHAMPION)) == (other_data, champion)
    # a champion registered before the gate used val (no val_top1): not compared either
    registry.client.delete_model_version_tag("data", other_data, "val_top1")
    newer = registry.register(val=0.95, test=0.95, dataset_hash="sha256:new")
    decision = promote(registry.config, "data", newer, margin=0.0)
    assert not decision["promoted"] and f"champion version {other_data} has no val_top1 tag" in decision["reason"]
    assert registry.alias("champion") == other_data


class FailingProxy:
    """A real HTTP server in front of the MLflow server that forwards every request, except that it answers
    ``500`` to the ``(method, path)`` pairs in ``failing`` (a registry that errors on one call)."""

    def __init__(self, upstream: str) -> None:
        self.failing: set[tuple[str, str]] = set()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                if (self.command, self.path.split("?")[0]) in proxy.failing:
                    body = json.dumps({"error_code": "INTERNAL_ERROR", "message": "registry unavailable"}).encode()
                    status, headers = 500, {"Content-Type": "application/json"}
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    request = urllib.request.Request(upstream + self.path, method=self.command,
                                                     data=self.rfile.read(length) if length else None,
                                                     headers={"Content-Type": "application/json"})
                    try:
                        with urllib.request.urlopen(request, timeout=30) as answer:
                            status, body, headers = answer.status, answer.read(), dict(answer.headers)
                    except urllib.error.HTTPError as error:
                        status, body, headers = error.code, error.read(), dict(error.headers)
                self.send_response(status)
                self.send_header("Content-Type", headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_registry_error_fails_promotion_and_the_champion_stays(server: str) -> None:
    registry = Registry(server, "flaky")
    champion = registry.register(val=0.90, test=0.90)
    assert promote(registry.config, "flaky", champion, margin=0.0)["promoted"]
    worse = registry.register(val=0.10, test=0.10)
    proxy = FailingProxy(server)
    try:
        through_proxy = TrackingConfig(uri=proxy.url, experiment="promotion")
        # what "does not exist" looks like through the proxy: no champion, not an error
        assert tracking.version_for_alias(through_proxy, "flaky", "no-such-alias") is None
        assert tracking.version_for_alias(through_proxy, "no-such-model", "champion") is None
        proxy.failing.add(("GET", ALIAS_PATH))  # reading an alias fails; setting one would work
        with pytest.raises(mlflow.exceptions.MlflowException, match="500"):
            tracking.version_for_alias(through_proxy, "flaky", "champion")
        with pytest.raises(mlflow.exceptions.MlflowException, match="500"):
            promote(through_proxy, "flaky", worse, margin=0.0)
    finally:
        proxy.close()
    assert registry.alias("champion") == champion
    assert tracking.PROMOTION_TAG not in registry.client.get_model_version("flaky", worse).tags
    assert not registry.lock_exists()  # released on the error




def test_a_lock_left_by_a_dead_promoter_is_broken_after_it_went_stale(server: str,
                                                                     capfd: pytest.CaptureFixture) -> None:
    registry = Registry(server, "stale")
    registry.client.create_registered_model(f"stale{tracking.REGISTRY_LOCK_SUFFIX}")  # its holder was killed
    with tracking.registry_lock(registry.config, "stale", stale_after=1.0):
        assert registry.lock_exists()  # ours now
    assert not registry.lock_exists()
    assert "breaking the promotion lock 'stale.promotion-lock' (unchanged for 1 s" in capfd.readouterr().err


def test_two_promoters_at_once_end_with_the_better_champion(server: str, promoter,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes (this one and a child) promote at the same moment (a file barrier), each round a candidate that
    beats the champion; the worse candidate writes its aliases later (a delay), so that without serialisation the
    worse would end champion. Who holds the better candidate alternates."""
    registry = Registry(server, "race")
    champion = registry.register(val=0.40, test=0.40)
    assert promote(registry.config, "race", champion, margin=0.0)["promoted"]
    rounds = 2  # the better candidate in this process, then in the child
    better = [registry.register(val=0.50 + 0.1 * k, test=0.5) for k in range(rounds)]
    worse = [registry.register(val=0.47 + 0.1 * k, test=0.9) for k in range(rounds)]
    slow, fast = 0.6, 0.05
    mine = [(better[k], fast) if k % 2 == 0 else (worse[k], slow) for k in range(rounds)]
    theirs = [(worse[k], slow) if k % 2 == 0 else (better[k], fast) for k in range(rounds)]
    child, barrier = promoter
    (barrier / "job.tmp").write_text(json.dumps([server, "race", "child", "test", theirs]))
    (barrier / "job.tmp").rename(barrier / "job.json")  # whole, at once
    set_alias, delay = tracking.set_alias, [0.0]

    def slow_set_alias(*args) -> None:
        time.sleep(delay[0])
        set_alias(*args)

    def meet(name: str) -> None:
        (barrier / name.format(me="test")).touch()
        deadline = time.monotonic() + 180
        while not (barrier / name.format(me="child")).exists():
            if child.poll() is not None:
                raise AssertionError(f"the child promoter exited {child.returncode}: {child.stdout.read()}")
            assert time.monotonic() < deadline, f"the child promoter never reached {name}"
            time.sleep(0.002)

    monkeypatch.setattr(tracking, "set_alias", slow_set_alias)
    for k, (version, seconds) in enumerate(mine):
        delay[0] = seconds
        meet(f"{k}-{{me}}")
        decisions = {version: promote(registry.config, "race", version, margin=0.0)}
        meet(f"{k}-{{me}}.done")
        other = json.loads((barrier / f"{k}-child.json").read_text())
        decisions[theirs[k][0]] = other
        previous = champion if k == 0 else better[k - 1]
        assert registry.alias("champion") == better[k], decisions
        assert decisions[better[k]]["promoted"], decisions
        # previous_champion is the champion right before the better one took over, as the decisions say
        if decisions[worse[k]]["promoted"]:  # the worse went first, beat the old champion, then lost its place
            assert registry.alias(PREVIOUS_CHAMPION) == worse[k], decisions
            assert f"champion {worse[k]} val_top1=" in decisions[better[k]]["reason"]
        else:  # the worse went second and lost to the better
            assert registry.alias(PREVIOUS_CHAMPION) == previous, decisions
            assert f"champion {better[k]} val_top1=" in decisions[worse[k]]["reason"]
        assert not registry.lock_exists()
    assert child.wait(timeout=60) == 0, child.stdout.read()


def test_the_pipeline_gates_on_val_and_reports_test(quickstart_run) -> None:
    """The shared pipeline run: pretraining read the train split only; distill scored the student on the val split
    (checked against a loop over the val rows); the registered version carries val_top1 and test_top1; promote
    decided on val_top1."""
    cfg, records = quickstart_run.cfg, quickstart_run.result.records
    assert pretrain_splits(read_manifest(cfg.data.path)) == ["train"]
    student = records["distill"].metrics
    model = tracking.load_torch_model(cfg.tracking, records["distill"].model_uri).eval()
    images, labels = load_split_tensors(cfg.data.path, "val", cfg.data.image_size)
    normalization = model.normalization()
    correct = 0
    with torch.no_grad():
        for image, label in zip(images, labels, strict=True):
            logits = model(normalization(image[None].float() / 255))
            correct += int(logits.argmax(dim=1).item() == label.item())
    assert student["val_top1"] == pytest.approx(correct / len(labels), abs=1e-6)
    client = MlflowClient(cfg.tracking.uri, registry_uri=cfg.tracking.uri)  # not an earlier test's registry URI
    version = client.get_model_version(cfg.registry.model_name, records["register"].version)
    assert float(version.tags["val_top1"]) == pytest.approx(student["val_top1"])
    assert float(version.tags["test_top1"]) == pytest.approx(student["test_top1"])
    teacher = client.get_model_version(f"{cfg.registry.model_name}-teacher", records["register"].teacher_version)
    assert float(teacher.tags["val_top1"]) == pytest.approx(student["teacher_val_top1"])
    promoted = records["promote"]
    assert promoted.promoted
    assert promoted.reason == (f"no champion yet [candidate val_top1={student['val_top1']:.4f} "
                               f"(test_top1 {student['test_top1']:.4f})]")
