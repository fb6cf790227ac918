"""A cross-entropy loss that holds a study's trials at a known point until the test releases them.

Tests that kill or interrupt a running study used to wait for files to appear and hope the study was
still running when they acted: on a fast machine it had already finished, on a busy one the test's
deadline passed first. The spec names this loss by import path (`"studygate:ce": {}`, with this folder
on PYTHONPATH), so the gate runs inside each trial's training loop with no change to the study code.

$STUDYGATE_DIR holds `config.json` (written by the test with `arm`) and the marker files; without
$STUDYGATE_DIR the loss is plain cross-entropy. A trial that has finished `hold_from_epoch` epochs (in
this process; epoch 0 = at its first step) once at least `after` files match the `records` glob writes
`held-<pid>.json` and waits there until `release` exists. The study cannot end while a trial waits, so
the test acts on a study that is certainly running, in a state it knows: the trial's last checkpoint is
of an epoch it finished, and its next epoch has not begun.

Every wait is bounded (TimeoutError says what it waited for) so a broken test fails the trial instead
of hanging forever; the tests' own deadlines are shorter and fail first.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

ENV = "STUDYGATE_DIR"
WAIT_S = 600.0  # longer than any test's own wait: the test reports first
POLL_S = 0.05


def arm(gate_dir: Path, *, records: str, after: int, hold_from_epoch: int = 1) -> dict[str, str]:
    """Write the gate's settings; returns the environment a study run needs to see them."""
    gate_dir.mkdir(parents=True, exist_ok=True)
    config = {"records": records, "after": after, "hold_from_epoch": hold_from_epoch}
    (gate_dir / "config.json").write_text(json.dumps(config))
    pythonpath = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    return {ENV: str(gate_dir), "PYTHONPATH": pythonpath}


def release(gate_dir: Path) -> None:
    """Let every held trial (and every later one) go on as plain cross-entropy."""
    (gate_dir / "release").touch()


def held(gate_dir: Path) -> list[dict]:
    """What each held trial wrote: {"pid", "epochs_done", "at"}."""
    return [json.loads(p.read_text()) for p in sorted(gate_dir.glob("held-*.json"))]


def wait_until_held(gate_dir: Path, proc: subprocess.Popen, timeout_s: float = 420.0) -> list[dict]:
    """Block until a trial is held; fail at once if `proc` (the driver) ended first."""
    deadline = time.monotonic() + timeout_s
    while not (found := held(gate_dir)):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before any trial was held")
        if time.monotonic() > deadline:
            raise AssertionError(f"no trial was held within {timeout_s:.0f} s")
        time.sleep(POLL_S)
    return found


class GatedCE(nn.Module):
    """Cross-entropy (optionally label-smoothed) behind the gate of the module docstring."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        gate_dir = os.environ.get(ENV)
        self.dir = Path(gate_dir) if gate_dir else None
        self.config = json.loads((self.dir / "config.json").read_text()) if self.dir else {}
        self.epochs_done = 0  # in this process: a trial resumed from a checkpoint counts anew
        self.passed = self.dir is None

    def on_epoch_end(self) -> None:
        self.epochs_done += 1

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if not self.passed:
            self._gate()
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def _gate(self) -> None:
        assert self.dir is not None
        release_file = self.dir / "release"
        if release_file.exists():
            self.passed = True
            return
        if self.epochs_done < self.config["hold_from_epoch"]:
            return
        if len(glob.glob(self.config["records"])) < self.config["after"]:
            return
        info = {"pid": os.getpid(), "epochs_done": self.epochs_done, "at": time.time()}
        tmp = self.dir / f".held-{os.getpid()}.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.dir / f"held-{os.getpid()}.json")  # the test never reads half a file
        deadline = time.monotonic() + WAIT_S
        while not release_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"studygate: waited {WAIT_S:.0f}s for {release_file}")
            time.sleep(POLL_S)
        self.passed = True


def ce() -> nn.Module:
    """Cross-entropy behind the study gate (tests only)."""
    return GatedCE()


def label_smoothing(alpha: float = 0.0) -> nn.Module:
    """Label-smoothed cross-entropy behind the study gate (tests only)."""
    return GatedCE(alpha)
