"""Ray-free helpers of the Ray adapter: reaching a cluster's address, reading a failed trial's error."""

from __future__ import annotations

import contextlib
import re
import socket
from pathlib import Path
from typing import Any


def check_tcp(address: str, timeout_s: float = 5.0) -> str | None:
    """None if host:port (IPv6 as [addr]:port, or ray://host:port) accepts a TCP connection, else a
    one-line reason. Only opens and closes one connection: a port that answers but is not Ray is
    caught later by ray.init."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return (
            "--address must be host:port, ray://host:port, 'auto' or 'local' (e.g. 10.0.0.5:6379), "
            f"but got {address!r}"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"cannot reach a Ray cluster at {address} ({exc})"


def trial_error_text(trial: Any) -> str:
    """The exception line of a failed trial's traceback (e.g. "RuntimeError: boom")."""
    texts = []
    with contextlib.suppress(Exception):  # best effort: the error file may be missing or unreadable
        # The local copy first: the one in the storage path is uploaded asynchronously.
        if trial.error_file and Path(trial.error_file).exists():
            texts.append(Path(trial.error_file).read_text())
    with contextlib.suppress(Exception):
        err = trial.get_error()
        if err is not None:
            texts.append(str(err))
    for text in texts:
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        exc_lines = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*", ln)]
        if exc_lines or lines:
            return (exc_lines or lines)[-1]
    return "trial failed (see Ray logs)"
