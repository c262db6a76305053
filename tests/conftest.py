"""Session-wide fixtures: one local Ray instance per test session (2 CPUs).

The dashboard stays on: it serves the state API through which Ray Train's placement-group cleaner sees that a
Train controller died (a Tune trial stopped by ASHA) and frees its workers' CPUs; without it they leak.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()
