"""A private local Ray from start to end: which processes it starts (no dashboard API server, no
autoscaler monitor, no idle workers nobody uses), that its start leaves Ray's own code as it was, and
that a finished study leaves no Ray process and no temp dir behind."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from study.sweep import tune as tune_lib
from study.sweep.runner import run_study

pytestmark = pytest.mark.slow

SPEC = """\
name: lifecycle
dataset: {name: mnist1d, options: {max_train: 600, max_test: 200}}
models: [cnn1d]
regularizers: {ce: {}}
noise: [{kind: none}]
train: {epochs: 2, batch_size: 64, lr: {low: 1.0e-3, high: 3.0e-2, log: true}}
search: {trials_per_cell: 2, sampler: random, pruner: {kind: none}}
final: {seeds: 1}
resources: {cpus_per_trial: 1}
"""


def _ray_processes() -> dict[int, str]:
    """This test process's live descendants (Ray's are all started by the driver): pid -> program, i.e.
    the executable or, for Python, its script ("ray::..." for a worker that has renamed itself)."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                argv = proc.cmdline() or [proc.name()]
                scripts = [a for a in argv[1:3] if a.endswith(".py")]
                found[proc.pid] = scripts[0] if "python" in Path(argv[0]).name and scripts else argv[0]
        except psutil.Error:
            continue
    return found


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REGSTUDY_CACHE", str(tmp_path / "cache"))  # Ray's processes inherit it
    return tmp_path / "cache"


def test_local_ray_starts_without_the_processes_a_study_never_uses(cache):
    from ray._private.node import Node

    methods = (Node.start_api_server, Node.start_monitor)
    assert not _ray_processes()
    handle = tune_lib.init_ray(None, num_cpus=1)
    try:
        programs = {Path(p).name if not p.startswith("ray::") else p for p in _ray_processes().values()}
        assert {"gcs_server", "raylet"} <= programs, programs
        assert "dashboard.py" not in programs, programs  # the API server (the raylet's agent is agent.py)
        assert "monitor.py" not in programs, programs  # the autoscaler monitor
        workers = [p for p in programs if p == "default_worker.py" or p == "ray::IDLE"]
        assert not workers, programs  # idle workers prestarted for Tune, which never uses them
        assert (Node.start_api_server, Node.start_monitor) == methods  # restored once ray.init returned
        assert Path(handle.temp_dir).is_dir()
    finally:
        tune_lib.shutdown(handle)
    assert not _ray_processes()
    assert not os.path.exists(handle.temp_dir)


def test_a_finished_study_leaves_no_ray_process_and_no_temp_dir(tmp_path, cache, monkeypatch):
    handles: list[tune_lib.RayHandle] = []
    seen: dict[str, list[str]] = {}
    init_ray, run_trials = tune_lib.init_ray, tune_lib.run_trials

    def recording_init(*args, **kwargs):
        handles.append(init_ray(*args, **kwargs))
        return handles[-1]

    def watched_run_trials(*args, **kwargs):
        run_trials(*args, **kwargs)
        seen["after_trials"] = list(_ray_processes().values())

    monkeypatch.setattr(tune_lib, "init_ray", recording_init)
    monkeypatch.setattr(tune_lib, "run_trials", watched_run_trials)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = run_study(spec, out=tmp_path / "out", quiet=True)
    assert (out / "trials.parquet").exists()
    assert len(handles) == 1 and handles[0].started_here
    # Ray ran the trials (its processes were there until the end) and is gone, with its temp dir.
    assert any(Path(p).name == "raylet" for p in seen["after_trials"]), seen
    assert not _ray_processes()
    assert not os.path.exists(handles[0].temp_dir)
