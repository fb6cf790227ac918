"""One writer per results directory: a file lock held by `study run` for its whole run.

Two drivers writing one results directory would train the same trials twice into the same checkpoint
files and interleave their records. The lock is an OS file lock (filelock: flock on Unix), so a driver
killed by SIGKILL releases it with its process; a sidecar file says who holds it (pid, host, start
time) for the error message of the driver that is refused, and lets `study ls` tell a running study
from one whose driver died (its manifest still says "running", but nobody holds the lock).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

import filelock

from study.vocabulary import LOCK_FILE, LOCK_OWNER_FILE


class LockedError(RuntimeError):
    """Another driver holds the results directory (the message names its pid and host)."""


def holder(out: Path) -> str:
    """Who holds `out`'s lock, as written in its sidecar ("pid 123 on host h since 12:00:00")."""
    try:
        owner = json.loads((out / LOCK_OWNER_FILE).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["since"]))
        return f"pid {owner['pid']} on host {owner['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its pid/host sidecar is missing or unreadable)"


class ResultsLock:
    """Exclusive lock on a results directory, held from `acquire` to `release` (a context manager).

    Raises (from acquire):
        LockedError: another driver holds it.
        OSError: the directory cannot be created or written (e.g. read-only).
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self._lock = filelock.FileLock(str(out / LOCK_FILE), timeout=0)

    def acquire(self) -> ResultsLock:
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise LockedError(
                f"{self.out}: another `study run` is writing here ({holder(self.out)}); "
                "wait for it to end or stop it, then run again (with --resume to continue)"
            ) from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        tmp = self.out / f"{LOCK_OWNER_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(owner))
        os.replace(tmp, self.out / LOCK_OWNER_FILE)
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            (self.out / LOCK_OWNER_FILE).unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> ResultsLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
