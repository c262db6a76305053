"""Nothing a driver started outlives it: a small watcher process that kills the driver's descendants once the
driver is gone, however it ended (``kill -9``, the OOM killer, a closed terminal).

A driver that starts its own local Ray owns the Ray processes (GCS, raylet, dashboard, agents, workers) as its
descendants. ``ray.shutdown`` stops them on a normal exit and on Ctrl-C; after ``kill -9`` Ray stops most of them
itself, but its DashboardAgent and RuntimeEnvAgent stay up for about a minute (measured: 60-84 s, a hard-coded
timeout in Ray) and whatever else is mid-start may linger.

    start(os.getpid())   # before ray.init: returns the watcher's Popen

The watcher (``python -m pipelines.guardian DRIVER_PID``) runs in its own session (Ctrl-C in the terminal does not
reach it) and every ``INTERVAL_SECONDS`` records the driver's descendants as ``(pid, create_time)``. When the driver
has exited it sends SIGKILL to each recorded process that is still alive with the same create time (a pid the
system reused for another process is left alone), then exits. Processes started in the last interval before the
driver died are not recorded; Ray's own clean-up ends those (a worker exits when its raylet does).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

INTERVAL_SECONDS = 0.5


def start(driver_pid: int) -> subprocess.Popen:
    """Start the watcher of ``driver_pid`` in its own session, its output discarded."""
    return subprocess.Popen([sys.executable, "-m", "pipelines.guardian", str(driver_pid)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def alive(process: psutil.Process) -> bool:
    """Whether ``process`` still runs (a zombie, or one that has exited, does not)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch(driver_pid: int, interval: float = INTERVAL_SECONDS) -> list[int]:
    """Record the descendants of ``driver_pid`` until it exits, then SIGKILL those still alive (same pid and create
    time); returns the pids killed. The calling process is never recorded."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return []
    recorded: dict[int, float] = {}
    while alive(driver):
        try:
            for child in driver.children(recursive=True):
                if child.pid != os.getpid():
                    recorded[child.pid] = child.create_time()  # a reused pid: the newest process holding it
        except psutil.NoSuchProcess:  # the driver ended while its children were listed
            break
        time.sleep(interval)
    killed = []
    for pid, created in recorded.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and alive(process):
                process.kill()
                killed.append(pid)
        except psutil.NoSuchProcess:
            pass
    return killed


if __name__ == "__main__":
    watch(int(sys.argv[1]))
