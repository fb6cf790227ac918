"""Fixtures shared by the sweep's tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import studygate

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


@pytest.fixture
def run_and_sigkill(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[str]]:
    """`run(spec_path, out, *args, records=GLOB, after=N, hold_from_epoch=1)`: `study run` (plus
    `args`) in the background until the study gate (tests/studygate.py) holds a trial - one that has
    finished `hold_from_epoch` epochs once `after` files match `out / GLOB` - then SIGKILL the driver
    and every process it started (Ray's own included): no chance to clean up. The gate is then
    released, so a `--resume` runs the study to its end. The spec's regularizers must be the gate's
    (`"studygate:ce"`, `"studygate:label_smoothing"`). Returns the command."""

    def run(spec_path: Path, out: Path, *args: str, records: str, after: int, hold_from_epoch: int = 1):
        gate = out.parent / "gate"
        # In os.environ, so that the resume the test runs next sees the (released) gate too.
        for key, value in studygate.arm(
            gate, records=str(out / records), after=after, hold_from_epoch=hold_from_epoch
        ).items():
            monkeypatch.setenv(key, value)
        cmd = [STUDY_BIN, "run", str(spec_path), "--out", str(out), "--quiet", "--no-report", *args]
        proc = subprocess.Popen(
            cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            studygate.wait_until_held(gate, proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        studygate.release(gate)
        return cmd

    return run


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
