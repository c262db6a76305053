"""Session-wide fixtures: one local Ray instance per test session (2 CPUs), and one shared end-to-end run of the
shrunk quickstart pipeline that several test files inspect (its stages, registry, served model, report).

The dashboard stays on: it serves the state API through which Ray Train's placement-group cleaner sees that a
Train controller died (a Tune trial stopped by ASHA) and frees its workers' CPUs; without it they leak.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


REPO = Path(__file__).resolve().parents[1]

BLOCK_PIPELINES_IMPORT = """
import sys
class NoPipelines:
    def find_spec(self, name, path=None, target=None):
        if name == "pipelines" or name.startswith("pipelines."):
            raise ImportError(f"{name} must not be needed to load a registered model")
sys.meta_path.insert(0, NoPipelines())
"""
"""Code that makes ``import pipelines`` fail, for a subprocess that shows a logged model loads without it."""


def shrunk_quickstart(tmp_path: Path, data_path: Path) -> dict:
    """The quickstart pipeline made tiny: ResNet-8 at 16 px, one epoch per training stage."""
    values = yaml.safe_load((REPO / "pipelines/configs/quickstart.yaml").read_text())
    values["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "mlartifacts")}
    values["data"]["path"] = str(data_path)
    values["method"]["config"].update(backbone="resnet8", projection_hidden_dim=32, projection_dim=16)
    values["scaling"].update(cpus_per_worker=0.5, storage_path=str(tmp_path / "runs"))
    values["pretrain"].update(epochs=1, knn_every=1)
    values["evaluate"].update(linear_probe_epochs=5)
    values["finetune"].update(epochs=1)
    values["distill"].update(epochs=1)
    return values


@dataclass(frozen=True)
class QuickstartRun:
    """The shared pipeline run: its config mapping, validated config, result and working folder."""

    values: dict
    cfg: object  # pipelines.config.PipelineConfig
    result: object  # pipelines.dag.PipelineResult
    workdir: Path


@pytest.fixture(scope="session")
def quickstart_run(ray_session, tmp_path_factory) -> QuickstartRun:
    """One run of the shrunk quickstart for the whole session: 2 Ray Train workers, fine-tuned with FixMatch on two
    nested labeled fractions (0.05, 0.1) for 2 epochs, the 0.05 teacher distilled.

    Tests inspect it; they may rerun it (every stage is then reused) but must not move its aliases or add versions:
    a test that needs to change the registry runs its own pipeline.
    """
    from pipelines.config import config_from_mapping
    from pipelines.dag import run_pipeline

    workdir = tmp_path_factory.mktemp("quickstart")
    values = shrunk_quickstart(workdir, workdir / "digits")
    values["scaling"]["num_workers"] = 2
    values["finetune"].update(label_fractions=[0.05, 0.1], epochs=2, batch_size=32, head_layers=1,
                              semi={"algorithm": "fixmatch", "unlabeled_ratio": 2, "unlabeled_rows": 300,
                                    "threshold": 0.5})
    values["distill"].update(teacher_fraction=0.05, labeled_loss_weight=0.5)
    cfg = config_from_mapping(values)
    return QuickstartRun(values=values, cfg=cfg, result=run_pipeline(cfg), workdir=workdir)



def _free_loopback_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


S3_ENV = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_loopback_port()}", "AWS_ACCESS_KEY_ID": "sslflow-test",
          "AWS_SECRET_ACCESS_KEY": "sslflow-test", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}
"""The test session's object store: set here, at import, before any Ray starts, so that Ray workers (and the
processes of the cluster test) inherit the endpoint and credentials exactly as a cluster node reads them from its
environment. Nothing listens on the endpoint until a test asks for ``s3_server``; real AWS is never reached."""
os.environ.update(S3_ENV)


@dataclass(frozen=True)
class S3Server:
    """A local S3-compatible server (moto in server mode) at ``S3_ENV["AWS_ENDPOINT_URL"]``."""

    endpoint: str
    pid: int

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (once) and return its ``s3://`` URI."""
        import boto3

        client = boto3.client("s3")  # endpoint and credentials from S3_ENV
        if name not in {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Start ``moto_server`` on the session's loopback endpoint and stop it by its pid at the end."""
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    endpoint = S3_ENV["AWS_ENDPOINT_URL"]
    executable = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as handle:
        process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", endpoint.rsplit(":", 1)[1]], stdout=handle,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"moto_server did not start at {endpoint}: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)
    try:
        yield S3Server(endpoint=endpoint, pid=process.pid)
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def chromium_browser():
    """Headless Debian chromium through its chromedriver (``.ci/run`` installs both when missing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert binary and driver, "chromium and chromedriver are missing: apt-get install -y chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # no background connections: a closed network refuses them, and chromium retries them at every start
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-quic"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def table_rows(browser, table_id: str) -> list[list[str]]:
    """The text of each body row's cells of the page's table ``table_id``."""
    from selenium.webdriver.common.by import By

    table = browser.find_element(By.ID, table_id)
    return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")]


def console_errors(browser) -> list[dict]:
    """The page's SEVERE browser-log entries (script errors, failed loads)."""
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def drawn(browser, image) -> bool:
    """Whether the ``<img>`` element has loaded and has a width: the image is on the page, not a broken icon."""
    return browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
