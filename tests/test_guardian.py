"""``pipelines.guardian``: when a driver dies by SIGKILL, the watcher kills every process the driver had started
(children and grandchildren, even those in a session of their own), and nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from pipelines import guardian

DRIVER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
                          "start_new_session=True); time.sleep(300)"])
print(child.pid, flush=True)
time.sleep(300)
"""
"""A stand-in driver: a child that starts a grandchild in a new session (as Ray's workers are), all sleeping."""


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_a_killed_drivers_descendants_are_killed_and_nothing_else() -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # not the driver's
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    watcher = guardian.start(driver.pid)
    try:
        int(driver.stdout.readline())
        assert _wait_for(lambda: len(psutil.Process(driver.pid).children(recursive=True)) == 2, 20)
        descendants = psutil.Process(driver.pid).children(recursive=True)
        assert len({os.getsid(p.pid) for p in descendants}) == 2  # the grandchild left the driver's session
        time.sleep(10 * guardian.INTERVAL_SECONDS)  # the watcher has recorded both, with a margin for a loaded machine
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert _wait_for(lambda: not any(map(guardian.alive, descendants)), 10), [p.pid for p in descendants]
        assert watcher.wait(timeout=10) == 0
        assert bystander.poll() is None
    finally:
        for process in (bystander, driver, watcher):
            process.kill()
