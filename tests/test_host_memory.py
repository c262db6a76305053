"""CPU Train workers keep the memory they free (``pipelines.host_memory``): the settings, their effect on page
faults, and that a real Ray Train worker starts with them."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import ScalingSection
from pipelines.host_memory import RETAIN_ENV, malloc_environment, retains_freed_memory, worker_runtime_env

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")

FAULTS_PER_ALLOCATION = """
import ctypes, json, resource, threading
import torch

ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages whatever the machine's THP setting

def allocate(times):
    for _ in range(times):
        block = torch.ones(96 << 20, dtype=torch.uint8)  # 96 MiB, written: every page touched
        del block

def run():
    allocate(20)  # warm-up: with RETAIN_ENV the heap grows until freed blocks fit the next request
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    allocate(10)
    result["faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

result = {}
thread = threading.Thread(target=run)  # as in a Ray Train worker: the loop runs in a thread of its own
thread.start()
thread.join()
print(json.dumps(result))
"""


def _faults_per_allocation(retain: bool) -> float:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_ALLOCATION], env=malloc_environment(retain), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["faults"]


def test_only_a_cpu_worker_that_asks_gets_the_retaining_settings() -> None:
    assert worker_runtime_env(True, use_gpu=False) == {"env_vars": RETAIN_ENV}
    assert worker_runtime_env(True, use_gpu=True) == {}
    assert worker_runtime_env(False, use_gpu=False) == {}
    assert ScalingSection().retain_freed_memory is True
    assert retains_freed_memory(RETAIN_ENV)
    assert not retains_freed_memory({**RETAIN_ENV, "MALLOC_ARENA_MAX": "2"})
    assert not retains_freed_memory({})
    environ = {"PATH": "/bin", "MALLOC_ARENA_MAX": "4", "MALLOC_PERTURB_": "1"}
    assert malloc_environment(False, environ) == {"PATH": "/bin"}
    assert malloc_environment(True, environ) == {"PATH": "/bin", **RETAIN_ENV}
    assert retains_freed_memory(malloc_environment(True, environ))


@glibc_only
def test_a_block_freed_in_a_thread_is_reused_without_page_faults() -> None:
    """A 96 MiB block allocated and freed in a thread, after a warm-up: glibc's defaults map it afresh each time (one
    fault per 4 KiB page, ~24,600); with ``RETAIN_ENV`` the heap keeps freed blocks and their pages stay mapped."""
    pages = (96 << 20) / 4096
    default = _faults_per_allocation(False)
    retained = _faults_per_allocation(True)
    assert default > 0.5 * pages, default
    assert retained < 0.02 * pages, retained


def test_a_cpu_train_worker_starts_with_the_retaining_settings(ray_session, tmp_path: Path) -> None:
    """A real Ray Train run of ``pipelines.ray_train.fit``: its CPU worker process has ``RETAIN_ENV`` (the default
    ``scaling.retain_freed_memory``; the test session's own environment has none of it)."""
    from pipelines.ray_train import fit

    def malloc_env(config: dict) -> dict[str, object]:  # nested: pickled by value (workers cannot import tests)
        from pipelines.host_memory import retains_freed_memory

        return {"retains": retains_freed_memory(), "arena_max": os.environ.get("MALLOC_ARENA_MAX")}

    assert not retains_freed_memory()
    scaling = ScalingSection(num_workers=1, cpus_per_worker=1.0, storage_path=str(tmp_path))
    assert fit(malloc_env, {}, scaling, "malloc", {}).return_value == {"retains": True, "arena_max": "1"}
