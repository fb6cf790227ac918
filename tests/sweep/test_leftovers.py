"""Nothing of a study is left behind (issue 24, item 6): a driver killed with SIGKILL leaves no Ray
process (its DashboardAgent and RuntimeEnvAgent lived ~60 s) and no private Ray temp dir after 15 s; a
refused run creates no --storage probe dir; `tracking: {mlflow: {}}` writes nothing outside --out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trialhook
from typer.testing import CliRunner

from study.cli import app
from study.sweep import reaper

pytestmark = pytest.mark.slow

STUDY_BIN = str(Path(sys.executable).with_name("study"))

SPEC = """\
name: leftovers
dataset: {name: mnist1d, options: {max_train: 400, max_test: 200}}
models: [mlp]
regularizers: [ce]
train: {epochs: 1, batch_size: 128}
search: {trials_per_cell: 2, sampler: random, pruner: {kind: none}}
final: {seeds: 1}
"""


def _tree(root: int) -> dict[int, int]:
    """pid -> start time of ``root`` and all its descendants."""
    table = reaper._table()
    pids = {root} | reaper._descendants({root}, table)
    return {p: table[p][1] for p in pids if p in table}


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_sigkilled_driver_leaves_no_process_or_temp_dir_after_15_s(tmp_path):
    started = tmp_path / "started"
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    # Ray workers import the hook: a trial says it has started and then waits to be killed, so the test
    # kills a driver whose Ray is certainly running trials.
    env = trialhook.env_with_hook(tmp_path / "hook", trialhook.HOLD, STUDY_STARTED=str(started))
    driver = subprocess.Popen(
        [STUDY_BIN, "run", str(spec), "--out", str(tmp_path / "out"), "--quiet", "--no-report"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_for(started.exists, 300), "no trial started"
        temp_dirs = [
            d for d in Path("/tmp").glob("rs-*")
            if (d / "driver").is_file() and (d / "driver").read_text().split()[0] == str(driver.pid)
        ]  # fmt: skip
        assert len(temp_dirs) == 1
        before = _tree(driver.pid)
        worker = int(started.read_text())
        assert worker in before and len(before) >= 5  # driver, GCS, raylet, agents, the trial's worker
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    killed_at = time.monotonic()

    def gone() -> bool:
        table = reaper._table()
        alive = [p for p, start in before.items() if p != driver.pid and table.get(p, (0, -1))[1] == start]
        return not alive and not temp_dirs[0].exists()

    assert _wait_for(gone, 15), [reaper._cmdline(p)[:80] for p in before if reaper.start_time(p) == before[p]]
    assert time.monotonic() - killed_at < 15


def test_refused_run_creates_no_storage_dir(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"study": "other", "spec_hash": "0"}')  # another study: refused
    storage = tmp_path / "storage"
    res = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--storage", str(storage)])
    assert res.exit_code == 2, res.output
    assert "holds a different study" in res.output
    assert not storage.exists()


def test_mlflow_default_writes_inside_out_only(tmp_path):
    pytest.importorskip("mlflow")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC + "tracking: {mlflow: {}}\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    res = subprocess.run(
        [STUDY_BIN, "run", str(spec), "--out", str(tmp_path / "out"), "--quiet", "--no-report"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in cwd.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "out", "spec.yaml"]
    assert any(p.name.startswith("mlflow") or p.name == "mlruns" for p in (tmp_path / "out").iterdir())
