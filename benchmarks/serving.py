"""Load benchmark of the two ways to serve a registered student: ``mlflow models serve`` (the python_function model,
one request = one forward) against ``sslflow serve`` (Ray Serve, ``@serve.batch`` across concurrent requests).

For each server and each number of concurrent clients, the clients (threads of this process, each one request of
one PNG image at a time, HTTP keep-alive off) send requests for ``--seconds``; we report requests/s and the p50 /
p99 latency. Variants are interleaved over ``--rounds`` rounds and the table gives the median over rounds and the
spread (min-max). The model is a randomly initialised student (the speed does not depend on the weights) logged and
registered exactly as the register stage does. Clients, servers and Ray share this machine's CPUs: on a 2-core
machine the numbers measure the whole box, not the server alone.

    python benchmarks/serving.py --backbone resnet18 --image-size 32 --clients 1 8 --seconds 20 --rounds 3
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


def register_student(work_dir: Path, backbone: str, image_size: int, num_classes: int) -> tuple[str, str]:
    """Log and register a random student as the register stage does; returns (tracking URI, model name)."""
    import torch

    from pipelines import tracking
    from pipelines.config import config_from_mapping
    from pipelines.serving.models import log_served_model
    from ssl_core.classifier import student_classifier
    from ssl_core.serving import ServingSpec

    cfg = config_from_mapping({"tracking": {"uri": f"sqlite:///{work_dir}/mlflow.db",
                                            "artifact_location": str(work_dir / "artifacts")}}, base=work_dir)
    run_id = tracking.start_run(cfg.tracking, "serving-benchmark")
    torch.manual_seed(0)
    model = student_classifier(backbone, image_size, num_classes).eval()
    spec = ServingSpec(kind="classifier", image_size=image_size, mean=model.mean, std=model.std,
                       class_names=tuple(str(i) for i in range(num_classes)),
                       architecture={"builder": "student", "backbone": backbone, "num_classes": num_classes})
    uri = log_served_model(cfg.tracking, run_id, "student", model, spec)
    version = tracking.register_version(cfg.tracking, uri, "bench-student", {"test_top1": 0.0})
    tracking.set_alias(cfg.tracking, "bench-student", tracking.CHAMPION, version)
    return cfg.tracking.uri, "bench-student"


def load(url: str, payload: bytes, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads POST ``payload`` back to back for ``seconds``; requests/s, p50/p99 latency (ms), errors."""
    latencies: list[float] = []
    errors = [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client() -> None:
        while time.monotonic() < stop:
            request = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                    ok = response.status == 200
            except OSError:
                ok = False
            elapsed = time.perf_counter() - started
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    ordered = sorted(latencies) or [float("nan")]
    return {"requests_per_s": len(latencies) / wall, "p50_ms": 1000 * ordered[len(ordered) // 2],
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "errors": errors[0],
            "requests": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from ssl_core.data import encode_png

    work_dir = Path(tempfile.mkdtemp(prefix="sslflow-serving-bench-"))
    tracking_uri, name = register_student(work_dir, args.backbone, args.image_size, args.num_classes)
    image = np.random.default_rng(0).integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
    payload = json.dumps({"instances": [{"image": base64.b64encode(encode_png(image)).decode()}]}).encode()

    mlflow_port = free_port()
    mlflow_server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(mlflow_port), "-w", "1"],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, cwd=work_dir, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    import ray
    from ray import serve

    from pipelines.serving.app import ServeOptions, run_app

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        wait_until_up(f"http://127.0.0.1:{mlflow_port}/ping")
        serve_url = run_app(ServeOptions(tracking_uri=tracking_uri, name=name, poll_seconds=0,
                                         max_batch_size=args.max_batch_size, num_cpus=args.replica_cpus),
                            port=free_port(), blocking=False)
        urls = {"mlflow models serve": f"http://127.0.0.1:{mlflow_port}/invocations", "sslflow serve": serve_url}
        for url in urls.values():  # warm up both
            load(url, payload, 1, 2.0)
        results: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for clients in args.clients:
                for server, url in urls.items():
                    results.setdefault(f"{server} | {clients} client(s)", []).append(
                        load(url, payload, clients, args.seconds))
    finally:
        serve.shutdown()
        ray.shutdown()
        os.killpg(mlflow_server.pid, signal.SIGTERM)
    print(f"student {args.backbone} at {args.image_size} px, 1 PNG image per request, {args.seconds:g} s per "
          f"variant x {args.rounds} interleaved rounds; {os.cpu_count()} CPUs shared by clients and servers")
    print(f"{'variant':<36} {'req/s (min-max)':>22} {'p50 ms':>14} {'p99 ms':>14} {'errors':>7}")
    for variant, rounds in results.items():
        rate = [r["requests_per_s"] for r in rounds]
        p50 = [r["p50_ms"] for r in rounds]
        p99 = [r["p99_ms"] for r in rounds]
        print(f"{variant:<36} {statistics.median(rate):>8.1f} ({min(rate):.1f}-{max(rate):.1f})"
              f"{statistics.median(p50):>10.1f}{statistics.median(p99):>15.1f}{sum(r['errors'] for r in rounds):>8}")
    if args.output:
        args.output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                          indent=2))


if __name__ == "__main__":
    main()
