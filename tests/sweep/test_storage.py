"""--storage against a real S3-compatible server (moto's server mode) on 127.0.0.1: write, and resume
from the storage into an empty local directory after the driver was killed mid-study."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import studygate

from study.sweep.storage import StorageError, open_storage

STUDY_BIN = str(Path(sys.executable).with_name("study"))
MOTO_BIN = str(Path(sys.executable).with_name("moto_server"))

SPEC = """\
name: s3study
dataset: {name: mnist1d, options: {max_train: 1000, max_test: 300}}
models: [cnn1d]
regularizers:
  ce: {}
  label_smoothing: {alpha: {low: 0.0, high: 0.3}}
noise: [{kind: none}]
train: {epochs: 6, lr: {low: 1.0e-3, high: 3.0e-2, log: true}}
search: {trials_per_cell: 5, n_startup_trials: 1, pruner: {kind: none}}
final: {seeds: 1}
"""
# The same losses behind the study gate (tests/studygate.py): plain ce / label smoothing once released.
GATED_SPEC = SPEC.replace("  ce:", '  "studygate:ce":').replace(
    "  label_smoothing:", '  "studygate:label_smoothing":'
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    port = _free_port()
    proc = subprocess.Popen(
        [MOTO_BIN, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "REGSTUDY_CACHE": str(tmp_path_factory.mktemp("cache")),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # The bucket exists before the study (regstudy never creates buckets).
    pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True, region="us-east-1"
    ).create_dir("bucket")
    yield env
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_unreachable_or_bad_storage_fails_fast_with_exit_2(tmp_path, s3_env):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"}  # nothing listens there
    # What starting the CLI costs on this machine now (busy or not): the refusal must add little to it.
    t0 = time.monotonic()
    subprocess.run([STUDY_BIN, "validate", str(spec)], capture_output=True, env=env, timeout=120, check=True)
    startup_s = time.monotonic() - t0
    t0 = time.monotonic()
    res = subprocess.run(
        [STUDY_BIN, "run", str(spec), "--out", str(tmp_path / "o"), "--storage", "s3://bucket/x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 2 and "cannot write there" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # S3 clients retry a refused endpoint for minutes by default; ours gives up after one 5 s timeout.
    assert time.monotonic() - t0 < startup_s + 30
    assert not (tmp_path / "o").exists()  # nothing was started or written
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        open_storage("gs://bucket/x")


@pytest.mark.slow
def test_study_writes_to_s3_and_resumes_from_it_after_ctrl_c(tmp_path, s3_env):
    spec = tmp_path / "s.yaml"
    spec.write_text(GATED_SPEC)
    first = tmp_path / "first"
    gate = tmp_path / "gate"
    gate_env = studygate.arm(gate, records=str(first / "records" / "search" / "*.json"), after=3)
    cmd = [STUDY_BIN, "run", str(spec), "--storage", "s3://bucket/prefix", "--quiet", "--no-report"]
    stderr = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen(
        [*cmd, "--out", str(first)],
        env={**os.environ, **gate_env},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    fs, _ = open_storage("s3://bucket/prefix")
    remote_records = "bucket/prefix/s3study/records/search"
    try:
        # Held mid-search (3 trials recorded, the next one waits at its epoch 2) until the driver is
        # interrupted: the study cannot end first, however fast or busy the machine.
        studygate.wait_until_held(gate, proc)
        deadline = time.monotonic() + 120
        while True:  # the driver mirrors records after every trial: wait for the third to reach S3
            found = fs.get_file_info(pafs.FileSelector(remote_records, allow_not_found=True))
            if len([f for f in found if f.path.endswith(".json")]) >= 3:
                break
            assert proc.poll() is None and time.monotonic() < deadline, "records never reached S3"
            time.sleep(0.2)
        # Ctrl-C (SIGINT to the driver): the study stops, says so, and can be resumed (test_tune
        # covers SIGKILL).
        proc.send_signal(signal.SIGINT)
        try:  # the interrupted driver mirrors the results dir to S3 before it exits: slow when busy
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired as exc:
            proc.send_signal(signal.SIGUSR1)  # the CLI's faulthandler: every thread's stack to stderr
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            stacks = (tmp_path / "stderr").read_text()[-6000:]
            raise AssertionError(f"no exit 300 s after Ctrl-C:\n{stacks}") from exc
    finally:
        stderr.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left behind in the driver's session
    studygate.release(gate)
    assert rc == 130
    manifest = json.loads(fs.open_input_stream("bucket/prefix/s3study/manifest.json").read())
    assert manifest["status"] == "interrupted"
    before = {
        f.base_name: json.loads(fs.open_input_stream(f.path).read())
        for f in fs.get_file_info(pafs.FileSelector(remote_records))
        if f.path.endswith(".json")
    }
    assert 3 <= len(before) < 10, "the driver must be interrupted mid-search"
    shutil.rmtree(first)  # another machine: only the storage is left

    second = tmp_path / "second"
    res = subprocess.run(
        [*cmd, "--out", str(second), "--resume"],
        env={**os.environ, **gate_env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    table = pq.read_table("bucket/prefix/s3study/trials.parquet", filesystem=fs).to_pandas()
    assert table["trial_id"].is_unique
    assert table.groupby(["cell_id", "phase"]).size().to_dict() == {
        ("mnist1d/cnn1d/studygate:ce/none", "final"): 1,
        ("mnist1d/cnn1d/studygate:ce/none", "search"): 5,
        ("mnist1d/cnn1d/studygate:label_smoothing/none", "final"): 1,
        ("mnist1d/cnn1d/studygate:label_smoothing/none", "search"): 5,
    }
    local = pd.read_parquet(second / "trials.parquet")
    assert sorted(local["trial_id"]) == sorted(table["trial_id"])
    after = {
        f.base_name: json.loads(fs.open_input_stream(f.path).read())
        for f in fs.get_file_info(pafs.FileSelector(remote_records))
        if f.path.endswith(".json")
    }
    for name, rec in before.items():
        assert after[name]["ended_at"] == rec["ended_at"], f"{name} was re-run"
    manifest = json.loads(fs.open_input_stream("bucket/prefix/s3study/manifest.json").read())
    assert manifest["status"] == "completed"
    assert fs.get_file_info("bucket/prefix/s3study/optuna.journal").size > 0
