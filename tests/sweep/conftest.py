"""Fixtures shared by the sweep's tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

STUDY_BIN = str(Path(sys.executable).with_name("study"))


@pytest.fixture(scope="module")
def env_cache(tmp_path_factory):
    # One MNIST-1D cache for every run of this module (and every Ray worker, which inherits the env).
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("REGSTUDY_CACHE")
    os.environ["REGSTUDY_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("REGSTUDY_CACHE", None)
    else:
        os.environ["REGSTUDY_CACHE"] = old


def _run_and_sigkill(spec_path: Path, out: Path, ready: Callable[[], bool], *args: str) -> list[str]:
    """`study run` (plus `args`) in the background until `ready()` (or 240 s), then SIGKILL the driver
    and every process it started (Ray's own included): no chance to clean up. Returns the command."""
    cmd = [STUDY_BIN, "run", str(spec_path), "--out", str(out), "--quiet", "--no-report", *args]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not ready():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return cmd


@pytest.fixture
def run_and_sigkill() -> Callable[..., list[str]]:
    return _run_and_sigkill


@pytest.fixture
def trial_source(tmp_path: Path) -> Callable[..., tuple[Any, Any]]:
    """`make(spec)` -> (TrialSource, StudyContext) over the spec's cells, Optuna journal in tmp_path,
    Ray-free: tests drive it the way Tune's searcher does."""
    from study.sweep.cells import expand_cells
    from study.sweep.context import StudyContext
    from study.sweep.optuna_cells import CellStudies
    from study.sweep.source import TrialSource

    def make(spec: Any) -> tuple[Any, Any]:
        cells = expand_cells(spec)
        studies = CellStudies(spec, cells, tmp_path / "optuna.journal")
        ctx = StudyContext(spec, tmp_path, studies, lambda: None)
        return TrialSource(spec, cells, studies, ctx), ctx

    return make
