"""Reaps a private local Ray whose driver died without ``ray.shutdown`` (SIGKILL, the OOM killer).

Run by ``tune.init_ray`` as ``python reaper.py DRIVER_PID TEMP_DIR`` in a session of its own, so that it
outlives the driver; a script with no imports from the package (it starts in ~30 ms). While the driver
lives, it notes the driver's children that belong to this Ray (GCS, raylet, log monitor: their command
lines name the private temp dir) and all their descendants every half second; once the driver is gone,
it kills those still running and their descendants (the raylet's DashboardAgent and RuntimeEnvAgent
would otherwise live ~60 s, its workers until they notice) and removes the temp dir. ``tune.shutdown``
stops it after a normal shutdown.

Linux only (``/proc``); ``init_ray`` does not start it elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

POLL_S = 0.5


def _table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # it has just exited
        out[int(name)] = (int(fields[1]), int(fields[19]))
    return out


def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot), None if there is no such process: a pid with
    its start time names one process, never a later one that reuses the pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def in_use(path: str) -> bool:
    """Whether a process's command line names ``path`` (a Ray process of that temp dir still runs)."""
    marker = path.encode()
    return any(marker in _cmdline(int(n)) for n in os.listdir("/proc") if n.isdigit())


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def reap(driver: int, temp_dir: str) -> None:
    me, marker = os.getpid(), temp_dir.encode()
    table = _table()
    if driver not in table:
        return
    driver_start = table[driver][1]
    try:
        pidfd: int | None = os.pidfd_open(driver)
    except (AttributeError, OSError):
        pidfd = None
    ray: dict[int, int] = {}  # pid -> start time of the driver's children that are this Ray's
    while True:
        for pid, (ppid, start) in table.items():
            if ppid == driver and pid != me and pid not in ray and marker in _cmdline(pid):
                ray[pid] = start
        # Their descendants too, while they are theirs: the GCS and raylet die with the driver, and
        # the agents they started are then reparented (no longer found below them).
        for pid in _descendants(set(ray), table) - {me}:
            ray.setdefault(pid, table[pid][1])
        if pidfd is not None:
            if select.select([pidfd], [], [], POLL_S)[0]:
                break
        else:
            time.sleep(POLL_S)
        table = _table()
        if table.get(driver, (0, -1))[1] != driver_start:
            break
    # Every process of this Ray, found before any is killed (a killed raylet's agents are reparented
    # and no longer its descendants), then killed until none is left.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        table = _table()
        alive = {pid for pid, start in ray.items() if table.get(pid, (0, -1))[1] == start}
        for pid in _descendants(alive, table) - {me}:
            ray.setdefault(pid, table[pid][1])
            alive.add(pid)
        if not alive:
            break
        for pid in alive:
            with contextlib.suppress(OSError):  # it has just exited
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def watched_temp_dir(root: str, prefix: str) -> Iterator[tuple[str, subprocess.Popen | None]]:
    """A new private temp dir under `root` and its watcher (`start`), after removing stale ones; both
    stopped if the block raises (Ray failed to start)."""
    remove_stale(root, prefix)
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir=root)
    proc = start(temp_dir)
    try:
        yield temp_dir, proc
    except BaseException:
        stop(proc, temp_dir)
        raise


def start(temp_dir: str) -> subprocess.Popen | None:
    """This script watching the calling driver (Linux; None elsewhere): if the driver dies without
    `stop`, it kills the driver's Ray and removes `temp_dir`. The driver's pid and start time are
    written in the dir, so that a later start can tell it is stale (`remove_stale`)."""
    if not sys.platform.startswith("linux"):
        return None
    Path(temp_dir, "driver").write_text(f"{os.getpid()} {start_time(os.getpid())}")
    return subprocess.Popen(
        [sys.executable, __file__, str(os.getpid()), temp_dir],
        start_new_session=True,  # outlives the driver and its process group (a Ctrl-C, a killpg)
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen | None, temp_dir: str) -> None:
    """After Ray has stopped (or failed to start): remove its temp dir and stop the watcher."""
    shutil.rmtree(temp_dir, ignore_errors=True)
    if proc is not None:
        proc.terminate()
        proc.wait()


def remove_stale(root: str, prefix: str) -> None:
    """Temp dirs under `root` whose driver is gone and whose Ray no longer runs (their watcher was
    killed too): removed at the next local start. A dir without a `driver` file (another Ray's, or one
    being created) is left alone."""
    if not sys.platform.startswith("linux"):
        return
    for d in Path(root).glob(f"{prefix}*"):
        try:
            pid, start = (int(v) for v in (d / "driver").read_text().split())
        except (OSError, ValueError):
            continue
        if start_time(pid) != start and not in_use(str(d)):
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver's group, not this session
    reap(int(sys.argv[1]), sys.argv[2])
