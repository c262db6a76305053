"""``sslflow serve``: a Ray Serve application that serves the registered model behind an alias and follows it.

Each replica loads ``models:/<name>@<alias>`` (a served model, ``pipelines.serving.models``), answers HTTP POSTs in
MLflow's scoring format, and batches concurrent requests on its device (``@serve.batch``: the images of up to
``max_batch_size`` requests go through the network in one forward). A background thread polls the registry every
``poll_seconds`` (and ``POST <route>/-/reload`` checks at once); when the alias points to another version, the
replica loads it next to the old one and swaps a single reference, so requests in flight finish on the old version
and none fails during the switch. On a cluster it is the same application with ``num_replicas`` replicas.

Request (JSON): ``{"instances": [{"image": "<base64 PNG/JPEG>"}, ...]}`` or ``{"inputs": {"image": [...]}}``; an
``image`` given as nested lists is a uint8 array (H, W, 3). Response: ``{"predictions": [record per image],
"model_version": "<version>", "batched_requests": <requests in the forward that answered it>}`` (records as in
``ssl_core.serving.Predictor``). A request the model cannot answer
(bad JSON, no ``image``, not an image, a wrong shape, an empty batch) gets a 400 with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ssl_core.serving import BadInput, images_from_values

RELOAD_PATH = "/-/reload"


@dataclass(frozen=True)
class ServeOptions:
    """What ``sslflow serve`` starts."""

    tracking_uri: str
    name: str
    alias: str = "champion"
    poll_seconds: float = 10.0
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        for key in ("poll_seconds", "batch_wait_timeout_s", "num_cpus", "num_gpus"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        for key in ("max_batch_size", "num_replicas"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")


def decode_request_values(payload: Any) -> list[Any]:
    """The ``image`` values of a JSON request: base64 strings become bytes, nested lists uint8 arrays."""
    if not isinstance(payload, dict):
        raise BadInput("the request body must be a JSON object with 'instances' or 'inputs'")
    if "instances" in payload:
        instances = payload["instances"]
        if not isinstance(instances, list):
            raise BadInput("'instances' must be a list of {\"image\": ...} objects")
        values = [item["image"] if isinstance(item, dict) and "image" in item else _missing(row)
                  for row, item in enumerate(instances)]
    elif "inputs" in payload:
        inputs = payload["inputs"]
        if not isinstance(inputs, dict) or "image" not in inputs:
            raise BadInput("'inputs' must be an object with a key 'image'")
        values = inputs["image"] if isinstance(inputs["image"], list) else [inputs["image"]]
    else:
        raise BadInput(f"the request needs 'instances' or 'inputs'; got keys {sorted(payload)}")
    return [_decode_value(value, row) for row, value in enumerate(values)]


def _missing(row: int) -> Any:
    raise BadInput(f"instance {row} has no key 'image'")


def _decode_value(value: Any, row: int) -> Any:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadInput(f"row {row}: 'image' is not valid base64") from None
    if isinstance(value, list):
        return value  # a uint8 array as nested lists; checked by ssl_core.serving
    raise BadInput(f"row {row}: 'image' must be a base64 string or a uint8 array, got {type(value).__name__}")


def _deployment_class():
    """The deployment, defined on first use so that importing this module does not import Ray Serve."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from pipelines import tracking
    from pipelines.config import TrackingConfig
    from pipelines.serving.models import load_predictor

    class AliasModelServer:
        def __init__(self, options: ServeOptions) -> None:
            self._options = options
            self._tracking = TrackingConfig(uri=options.tracking_uri)
            self._device = "cuda" if options.num_gpus > 0 and torch.cuda.is_available() else "cpu"
            self._lock = threading.Lock()
            self._current: tuple[str, Any] | None = None
            self.reload()
            if options.poll_seconds > 0:
                threading.Thread(target=self._poll_forever, name="alias-poller", daemon=True).start()
            self._predict_batched = serve.batch(max_batch_size=options.max_batch_size,
                                                batch_wait_timeout_s=options.batch_wait_timeout_s)(self._forward)

        def reload(self) -> str:
            """Load the alias's version if it moved; returns the version served now."""
            with self._lock:
                version = tracking.version_for_alias(self._tracking, self._options.name, self._options.alias)
                if version is None:
                    raise LookupError(f"no registered model {self._options.name}@{self._options.alias}")
                if self._current is None or self._current[0] != str(version.version):
                    uri = f"models:/{self._options.name}/{version.version}"
                    self._current = (str(version.version), load_predictor(self._tracking, uri, self._device))
                return self._current[0]

        def _poll_forever(self) -> None:
            while True:
                time.sleep(self._options.poll_seconds)
                try:
                    self.reload()
                except Exception as error:  # noqa: BLE001 - keep serving the loaded version; say why
                    print(f"[sslflow serve] reload of {self._options.name}@{self._options.alias} failed: {error}",
                          flush=True)

        async def _forward(self, batches: list[torch.Tensor]) -> list[tuple[str, int, list[dict[str, Any]]]]:
            version, predictor = self._current  # one reference: the whole batch sees one version
            sizes = [len(batch) for batch in batches]
            outputs = await asyncio.to_thread(predictor.forward_images, torch.cat(batches))
            records = predictor.records(outputs)
            answers, start = [], 0
            for size in sizes:
                answers.append((version, len(batches), records[start:start + size]))
                start += size
            return answers

        async def __call__(self, request: Request) -> JSONResponse:
            if request.url.path.rstrip("/").endswith(RELOAD_PATH):
                version = await asyncio.to_thread(self.reload)
                return JSONResponse({"model_version": version})
            try:
                try:
                    payload = await request.json()
                except ValueError:
                    raise BadInput("the request body is not valid JSON") from None
                values = decode_request_values(payload)
                images = images_from_values(values, self._current[1].spec.image_size)
            except BadInput as error:
                return JSONResponse({"error_code": "BAD_REQUEST", "message": str(error)}, status_code=400)
            version, batched_requests, records = await self._predict_batched(images)
            return JSONResponse({"predictions": records, "model_version": version,
                                 "batched_requests": batched_requests})

    return serve.deployment(AliasModelServer)


def build_app(options: ServeOptions):
    """The Ray Serve application of ``options`` (pass to ``serve.run``)."""
    deployment = _deployment_class()
    actor_options = {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus}
    return deployment.options(num_replicas=options.num_replicas, ray_actor_options=actor_options,
                              max_ongoing_requests=max(8, 2 * options.max_batch_size)).bind(options)


def run_app(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/",
            blocking: bool = True) -> str:
    """Start Serve's HTTP proxy on ``host:port`` and deploy the application; returns its URL. ``blocking`` waits
    until Ctrl-C, then shuts Serve down."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options), name="sslflow", route_prefix=route_prefix)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    if blocking:
        print(f"serving {options.name}@{options.alias} at {url} (POST JSON; {url}{RELOAD_PATH} reloads); Ctrl-C "
              "stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
