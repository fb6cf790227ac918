"""A local study from the outside, as a hostile user sees it: the sockets its Ray listens on, a second
driver on the same results dir, SIGKILL of the driver (no Ray process may outlive it), a journal torn by
the crash, and the resume that must still finish the study with group-readable files."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import psutil
import pytest
import studygate

from reports.build import check_parquet
from reports.query import list_studies
from study import vocabulary

pytestmark = pytest.mark.slow

STUDY_BIN = str(Path(sys.executable).with_name("study"))
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
MARK = "REGSTUDY_TEST_RUN"  # every process of the run (Ray's included) inherits it: how we find them

SPEC = """\
name: private
dataset: {name: mnist1d, options: {max_train: 1200, max_test: 400}}
models: [cnn1d]
regularizers: {"studygate:ce": {}, "studygate:label_smoothing": {alpha: {low: 0.0, high: 0.3}}}
noise: [{kind: none}]
train: {epochs: 8, batch_size: 64, lr: {low: 1.0e-4, high: 3.0e-2, log: true}}
search: {trials_per_cell: 6, sampler: random, pruner: {kind: none}}
final: {seeds: 1}
resources: {cpus_per_trial: 1}
"""


def _run_processes(mark: str) -> list[psutil.Process]:
    """Live processes started by the run tagged `mark` (the driver, gcs, raylet, agents, workers)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _listening(procs: list[psutil.Process]) -> dict[str, set[str]]:
    """Process name -> the addresses of its listening TCP sockets."""
    out: dict[str, set[str]] = {}
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    out.setdefault(proc.name(), set()).add(conn.laddr.ip)
        except psutil.Error:
            continue
    return out


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """`study run` held by the study gate (tests/studygate.py) once its search has recorded a trial;
    then what it listens on, a second driver's answer, and how long its Ray processes survive a SIGKILL
    of the driver alone. The gate stays shut until the driver is dead: the run is certainly alive for
    every observation, however fast or busy the machine."""
    root = tmp_path_factory.mktemp("private")
    spec = root / "spec.yaml"
    spec.write_text(SPEC)
    out = root / "out"
    gate = root / "gate"
    mark = uuid.uuid4().hex
    env = {
        **os.environ,
        MARK: mark,
        "REGSTUDY_CACHE": str(root / "cache"),
        **studygate.arm(gate, records=str(out / "records" / "search" / "*.json"), after=1),
    }
    cmd = [STUDY_BIN, "run", str(spec), "--out", str(out), "--quiet", "--no-report"]
    driver = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    seen: dict = {"cmd": cmd, "env": env, "out": out, "mark": mark, "gate": gate}
    try:
        studygate.wait_until_held(gate, driver)
        seen["second"] = subprocess.run(
            [*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=120
        )
        procs = _run_processes(mark)
        seen["names"] = {p.name() for p in procs}
        seen["listening"] = _listening(procs)
        seen["driver_pid"] = driver.pid
        seen["ls_running"] = {s["study"]: s["status"] for s in list_studies(root)}
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        killed_at = time.time()
        while _run_processes(mark) and time.time() < killed_at + 15:
            time.sleep(0.2)
        seen["left_after_s"] = time.time() - killed_at
        seen["left"] = [(p.pid, p.name()) for p in _run_processes(mark)]
        seen["ls_killed"] = {s["study"]: s["status"] for s in list_studies(root)}
        studygate.release(gate)  # the resumes below run the study to its end
        yield seen
    finally:
        if driver.poll() is None:
            driver.kill()
        for proc in _run_processes(mark):  # only this run's processes, whatever a failed check left
            proc.kill()


def test_every_ray_socket_of_a_local_study_is_on_loopback(killed_run):
    names, listening = killed_run["names"], killed_run["listening"]
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), names
    assert {"gcs_server", "raylet"} <= set(listening), listening
    for name, addrs in listening.items():
        assert addrs <= LOOPBACK, f"{name} listens on {addrs}"


def test_a_second_driver_on_the_same_dir_is_refused(killed_run):
    res = killed_run["second"]
    assert res.returncode == 2, res.stderr
    assert f"pid {killed_run['driver_pid']} on host" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # A live run (its lock held) shows its own phase, never "interrupted"; which phase depends on how
    # far it got before the listing (search_done under load).
    assert killed_run["ls_running"]["private"] in vocabulary.RUNNING_STATUSES


def test_no_ray_process_outlives_a_sigkilled_driver(killed_run):
    assert killed_run["left"] == []
    assert killed_run["ls_killed"] == {"private": "interrupted"}


def test_torn_journal_resumes_to_a_complete_study(killed_run):
    out, env = killed_run["out"], killed_run["env"]
    journal = out / "optuna.journal"
    whole = journal.read_bytes()
    last = whole.rstrip(b"\n").rsplit(b"\n", 1)[1]
    journal.write_bytes(whole + last[: len(last) // 2])  # the driver died inside an append
    old = os.umask(0o022)
    try:
        res = subprocess.run(
            [*killed_run["cmd"], "--resume"], env=env, capture_output=True, text=True, timeout=600
        )
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "incomplete last record" in res.stdout + res.stderr
    trials = pd.read_parquet(out / "trials.parquet")
    assert trials["trial_id"].is_unique
    counts = trials.groupby(["cell_id", "phase"]).size().unstack()
    assert len(counts) == 2 and (counts["search"] == 6).all() and (counts["final"] == 1).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert any("incomplete last record" in n for n in manifest["notes"])
    # Files others read: group-readable; the working state of search trials is gone, final models stay.
    for path in [
        *out.glob("*.parquet"),
        out / "manifest.json",
        out / "optuna.journal",
        *out.glob("records/*/*"),
    ]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert not list((out / "checkpoints").glob("search*"))
    finals = list((out / "checkpoints").glob("final*"))
    assert len(finals) == 2 and all((d / "model.pt").exists() for d in finals)


def test_resume_of_a_completed_study_says_so_and_rebuilds_damaged_tables(killed_run):
    out, env = killed_run["out"], killed_run["env"]
    manifest = (out / "manifest.json").read_text()
    (out / "trials.parquet").write_bytes(b"not parquet")
    (out / "summary.parquet").write_bytes(b"PAR1 torn")
    res = subprocess.run(
        [*killed_run["cmd"], "--resume"], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "already completed; nothing to resume (rebuilt damaged trials.parquet, summary.parquet)" in (
        res.stdout.replace("\n", "")
    )
    check_parquet(out / "trials.parquet")
    assert len(pd.read_parquet(out / "summary.parquet")) > 0
    assert len(pd.read_parquet(out / "trials.parquet")) == 2 * 6 + 2
    assert (out / "manifest.json").read_text() == manifest
