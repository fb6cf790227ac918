"""Cross-entropy losses that pin where tests/test_multinode.py's trials train, by file barriers.

Left to Ray, which node a trial lands on is scheduling luck: on a loaded 2-core machine the worker node's
first actor can take longer to start than the head needs to run the whole study, and then every trial
trains on the head. The spec names these losses by import path (`"nodegate:ce": {}`), so the gates run
inside each trial's training loop with no change to the study code. $NODEGATE_DIR (set for the Ray nodes
when they start) holds `config.json`, written by the test before each study run, and the marker files;
without $NODEGATE_DIR the losses are plain cross-entropy.

- A trial on the worker node (config `worker_ip`) writes `on-worker-<pid>.json` at its first step; with
  `hold`, instead, at the start of its epoch 2 (epoch 1 reported and checkpointed), and then waits there
  until the node is killed: the test knows a trial is mid-training there, in which state and process.
- A trial on any other node, once `head_after` trial records exist under `records`, waits at the start
  of its epoch 2 until some `on-worker-*` file exists. The head has one CPU: with its trial waiting,
  Tune's next trial can only go to the worker, so the study cannot end with the worker unused.

Every wait is bounded (TimeoutError says what it waited for) so a broken cluster fails the trial instead
of hanging it; the tests' own deadlines are shorter and fail first, with the driver's log.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

WAIT_S = 300.0  # longer than the test's own wait for the marker (240 s): the test reports first
POLL_S = 0.1


def write_config(gate_dir: Path, *, worker_ip: str, records: Path, head_after: int, hold: bool) -> None:
    """The gates' settings for the next study run (see the module docstring)."""
    gate_dir.mkdir(parents=True, exist_ok=True)
    config = {"worker_ip": worker_ip, "records": str(records), "head_after": head_after, "hold": hold}
    (gate_dir / "config.json").write_text(json.dumps(config))


def worker_markers(gate_dir: Path) -> list[dict]:
    """What each trial that reached the worker node wrote: {"pid", "node", "epochs_done", "at"}."""
    return [json.loads(p.read_text()) for p in sorted(gate_dir.glob("on-worker-*.json"))]


def _node_ip() -> str:
    import ray  # inside a Ray worker, where the trainable has already imported it

    return ray.util.get_node_ip_address()


def _wait_for(what: str, ready: Callable[[], bool]) -> None:
    deadline = time.time() + WAIT_S
    while not ready():
        if time.time() > deadline:
            raise TimeoutError(f"nodegate: waited {WAIT_S:.0f}s for {what}")
        time.sleep(POLL_S)


class GatedCE(nn.Module):
    """Cross-entropy (optionally label-smoothed) behind the gates of the module docstring."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.epochs_done = 0  # in this process: a trial resumed from a checkpoint counts anew
        gate_dir = os.environ.get("NODEGATE_DIR")
        self.dir = Path(gate_dir) if gate_dir else None
        self.config = json.loads((self.dir / "config.json").read_text()) if self.dir else {}
        self.on_worker = self.dir is not None and _node_ip() == self.config["worker_ip"]
        self.passed = self.dir is None  # True once this trial is past every gate

    def on_epoch_end(self) -> None:
        self.epochs_done += 1

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if not self.passed:
            self._gate()
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def _gate(self) -> None:
        assert self.dir is not None
        if self.on_worker:
            if not self.config["hold"]:
                self._mark()
                self.passed = True
            elif self.epochs_done >= 1:
                # Marked only now, so the test kills a trial in a known state: epoch 1 reported and
                # checkpointed, epoch 2 not begun. Only that SIGKILL ends the wait: nothing makes "never".
                self._mark()
                _wait_for("the worker node to be killed", (self.dir / "never").exists)
            return
        if self.epochs_done < 1:
            return
        ended = len(list(Path(self.config["records"]).glob("*/*.json")))
        if ended >= self.config["head_after"]:
            _wait_for(f"an on-worker-* file in {self.dir}", lambda: any(self.dir.glob("on-worker-*.json")))
            self.passed = True

    def _mark(self) -> None:
        info = {"pid": os.getpid(), "node": _node_ip(), "epochs_done": self.epochs_done, "at": time.time()}
        tmp = self.dir / f".on-worker-{os.getpid()}.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.dir / f"on-worker-{os.getpid()}.json")  # the test never reads half a file


def ce() -> nn.Module:
    """Cross-entropy behind the node gates (tests only)."""
    return GatedCE()


def label_smoothing(alpha: float = 0.0) -> nn.Module:
    """Label-smoothed cross-entropy behind the node gates (tests only)."""
    return GatedCE(alpha)
