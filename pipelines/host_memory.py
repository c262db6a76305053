"""glibc malloc settings under which a CPU training process keeps the memory it frees and reuses it.

By default glibc hands every block of 32 MiB or more back to the kernel when it is freed (``munmap``; in a thread's
own arena, every block over 64 MiB), so a training step's activations (SimCLR ResNet-18 at 32 px, batch 256: the
first layer's output alone is 134 MB) are mapped again at the next step and every page is faulted in and zeroed
by the kernel: about 5,000 page faults per image and a fifth of the CPU time in the kernel. ``RETAIN_ENV``::

    MALLOC_ARENA_MAX=1           one arena for every thread (Ray Train runs the training in a thread of its own)
    MALLOC_MMAP_MAX_=0           no block is mapped on its own: all come from the arena's heap
    MALLOC_TRIM_THRESHOLD_=2**40 the heap is never given back to the kernel

makes freed blocks reusable as they are: on 2 cores (``benchmarks/throughput.py --malloc glibc|retain``, README
"Threads, memory, priority and the kNN monitor") 35 -> 50 images/s and 0.39 -> 0.01 CPUs in the kernel, for a
peak resident size about a third higher (freed blocks are reused, not returned). glibc reads these variables when
a process starts, so they reach a Ray Train worker through its runtime environment (``worker_runtime_env``); other
C libraries (musl, macOS) ignore them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

RETAIN_ENV: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
}


def worker_runtime_env(retain_freed_memory: bool, use_gpu: bool) -> dict[str, Any]:
    """The Ray runtime environment of a Train worker: ``RETAIN_ENV`` as its environment variables for a CPU worker
    with ``retain_freed_memory`` (``scaling.retain_freed_memory``); empty otherwise (a GPU worker's activations live
    in the CUDA caching allocator, which already keeps what it frees)."""
    return {"env_vars": dict(RETAIN_ENV)} if retain_freed_memory and not use_gpu else {}


def retains_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started with ``RETAIN_ENV`` (every variable at its value)."""
    return all(environ.get(name) == value for name, value in RETAIN_ENV.items())


def malloc_environment(retain: bool, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``environ`` without glibc's malloc variables (every ``MALLOC_*``), plus ``RETAIN_ENV`` when ``retain``: the
    environment to start a process with for one setting or the other (``False``: glibc's defaults)."""
    env = {name: value for name, value in environ.items() if not name.startswith("MALLOC_")}
    return {**env, **RETAIN_ENV} if retain else env
