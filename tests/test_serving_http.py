"""Serving over HTTP for real: ``mlflow models serve`` of the shared run's champion, and ``sslflow serve`` (Ray
Serve) following an alias that moves while clients keep asking."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import tracking
from pipelines.config import config_from_mapping
from pipelines.datasets import split_files
from pipelines.serving.models import load_predictor, log_served_model
from ssl_core.classifier import student_classifier
from ssl_core.data import encode_png
from ssl_core.serving import ServingSpec

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload, timeout: float = 60.0) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _wait_until_up(url: str, process: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {process.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not come up in {timeout} s")


def _test_rows(data_path: str) -> tuple[list[bytes], list[int]]:
    """The stored bytes and labels of the labeled test rows, in shard order (as evaluation reads them)."""
    table = pq.read_table(split_files(data_path, "test"), columns=["image", "label", "split"])
    table = table.filter(pc.and_(pc.equal(table.column("split"), "test"), pc.is_valid(table.column("label"))))
    return table.column("image").to_pylist(), table.column("label").to_pylist()


def test_mlflow_models_serve_answers_the_champion_like_offline(quickstart_run, tmp_path: Path) -> None:
    cfg = quickstart_run.cfg
    name = cfg.registry.model_name
    champion = tracking.version_for_alias(cfg.tracking, name, tracking.CHAMPION)
    images, labels = _test_rows(cfg.data.path)
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.uri}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/ping", server, timeout=180)
        url = f"http://127.0.0.1:{port}/invocations"
        status, answer = _post(url, {"instances": [{"image": base64.b64encode(data).decode()} for data in images]})
        assert status == 200, answer
        served = answer["predictions"]
        offline = load_predictor(cfg.tracking, f"models:/{name}/{champion.version}").predict({"image": images})
        assert [r["label_index"] for r in served] == [r["label_index"] for r in offline]
        for served_record, offline_record in zip(served, offline):
            assert served_record["probabilities"] == pytest.approx(offline_record["probabilities"], abs=1e-6)
        accuracy = float(np.mean([r["label_index"] == label for r, label in zip(served, labels)]))
        assert accuracy == pytest.approx(float(champion.tags["test_top1"]), abs=1e-6)  # test_top1 went through float32

        not_an_image = base64.b64encode(b"definitely not a PNG").decode()
        for bad, reason in (({"instances": [{"image": not_an_image}]}, "not a decodable image"),
                            ({"instances": []}, "empty batch"), ({"instances": [{"picture": "x"}]}, "enforce schema"),
                            (b"{not json", "valid JSON")):
            status, answer = _post(url, bad)
            assert 400 <= status < 500, (bad, status, answer)
            # MLflow answers a model's exception with a generic message and the model's reason in the stack trace
            assert reason in answer.get("message", "") + answer.get("stack_trace", ""), answer
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
            assert response.status == 200  # still alive after the bad requests
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_register_stage_logs_the_encoder_onnx_copies_and_descriptions(quickstart_run) -> None:
    from mlflow.tracking import MlflowClient

    cfg = quickstart_run.cfg
    name = cfg.registry.model_name
    register = quickstart_run.result.records["register"]
    client = MlflowClient(cfg.tracking.uri, registry_uri=cfg.tracking.uri)  # not an earlier test's registry URI
    run = client.get_run(register.run_id)
    assert sorted(a.path for a in client.list_artifacts(register.run_id, "onnx")) == [
        "onnx/encoder.onnx", "onnx/student.onnx", "onnx/teacher.onnx"]
    assert all(run.data.metrics[f"onnx_max_abs_diff_{role}"] < 1e-4 for role in ("student", "teacher", "encoder"))
    for registered in (name, f"{name}-teacher", f"{name}-encoder"):
        model = client.get_registered_model(registered)
        assert "ssl_core" in model.description and "mlflow.pyfunc.load_model" in model.description
    encoder_version = run.data.tags["registered_encoder_version"]
    assert client.get_model_version(f"{name}-encoder", encoder_version).description.count("sha256:") == 1

    images, _ = _test_rows(cfg.data.path)
    encoder = load_predictor(cfg.tracking, f"models:/{name}-encoder/{encoder_version}")
    embeddings = torch.tensor([r["embedding"] for r in encoder.predict({"image": images[:16]})])
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(16), atol=1e-5)
    teacher = tracking.model_version(cfg.tracking, f"{name}-teacher", register.teacher_version)
    pretrained = tracking.load_torch_model(cfg.tracking, teacher.tags["source_model_uri"])  # the fine-tuned teacher
    assert pretrained is not None


def _tiny_store(tmp_path: Path):
    """A store with two versions of ``tiny`` that answer differently: v1 always class ``a``, v2 always ``b``."""
    cfg = config_from_mapping({"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db",
                                            "artifact_location": str(tmp_path / "artifacts")}}, base=tmp_path)
    run_id = tracking.start_run(cfg.tracking, "tiny")
    spec = ServingSpec(kind="classifier", image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                       class_names=("a", "b"), architecture={"builder": "student", "backbone": "resnet8",
                                                             "num_classes": 2})
    versions = []
    for winner in (0, 1):
        torch.manual_seed(winner)
        model = student_classifier("resnet8", 8, 2, mean=spec.mean, std=spec.std).eval()
        with torch.no_grad():
            model.linear.bias[winner] = 10.0
        uri = log_served_model(cfg.tracking, run_id, f"tiny{winner}", model, spec)
        versions.append(tracking.register_version(cfg.tracking, uri, "tiny", {"test_top1": 0.5}))
    tracking.set_alias(cfg.tracking, "tiny", tracking.CHAMPION, versions[0])
    return cfg.tracking, versions


def test_sslflow_serve_follows_the_alias_without_failing_a_request(ray_session, tmp_path: Path) -> None:
    from ray import serve

    from pipelines.serving.app import ServeOptions, run_app

    tracking_config, (first, second) = _tiny_store(tmp_path)
    port = _free_port()
    options = ServeOptions(tracking_uri=tracking_config.uri, name="tiny", poll_seconds=0.5, num_cpus=0.5,
                           max_batch_size=8)
    png = base64.b64encode(encode_png(np.full((8, 8, 3), 100, dtype=np.uint8))).decode()
    answers: list[tuple[int, str | None, list[str]]] = []
    batched: list[int] = []
    stop = threading.Event()

    def client(images: int) -> None:
        while not stop.is_set():
            status, answer = _post(url, {"instances": [{"image": png}] * images})
            answers.append((status, answer.get("model_version"), [r["label"] for r in answer.get("predictions", [])]))
            batched.append(answer.get("batched_requests", 0))

    try:
        url = run_app(options, port=port, blocking=False)
        clients = [threading.Thread(target=client, args=(1 + i % 3,)) for i in range(4)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 60
        while not any(version == first for _, version, _ in answers) and time.monotonic() < deadline:
            time.sleep(0.2)
        tracking.set_alias(tracking_config, "tiny", tracking.CHAMPION, second)  # move the alias under load
        while not any(version == second for _, version, _ in answers) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for thread in clients:
            thread.join(timeout=60)

        assert answers and all(status == 200 for status, _, _ in answers), [a for a in answers if a[0] != 200][:3]
        assert {version for _, version, _ in answers} == {first, second}
        assert max(batched) > 1  # concurrent requests went through the network together (@serve.batch)
        for _, version, labels in answers:
            assert set(labels) == ({"a"} if version == first else {"b"})
        last_first = max(i for i, (_, version, _) in enumerate(answers) if version == first)
        assert all(version == second for _, version, _ in answers[last_first + len(clients):])

        not_an_image = base64.b64encode(b"no image").decode()
        for bad, reason in (({"instances": [{"image": not_an_image}]}, "not a decodable image"),
                            ({"instances": []}, "empty batch"), (b"{not json", "not valid JSON"),
                            ({"instances": [{"image": [[1, 2], [3, 4, 5]]}]}, "row 0")):
            status, answer = _post(url, bad)
            assert status == 400 and reason in answer["message"], (bad, status, answer)
        status, answer = _post(url, {"instances": [{"image": np.full((8, 8, 3), 7).tolist()}]})  # a uint8 array
        assert status == 200 and answer["predictions"][0]["label"] == "b"
    finally:
        stop.set()
        serve.shutdown()
