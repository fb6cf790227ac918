"""Resume repairs or explains (issue 24, item 5): bytes garbled mid-journal and truncated records are set
aside with one note each and what they described runs again; a full disk ends the run with one line and
a `failed` manifest; an offline `download: true` is one line."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import trialhook

from study.sweep.records import Records

pytestmark = pytest.mark.slow

STUDY_BIN = str(Path(sys.executable).with_name("study"))

SPEC = """\
name: damaged
dataset: {name: mnist1d, options: {max_train: 400, max_test: 200}}
models: [mlp]
regularizers: {ce: {}, label_smoothing: {alpha: 0.1}}
noise: [{kind: none}]
train: {epochs: 1, batch_size: 128, lr: {low: 1.0e-3, high: 1.0e-2}}
search: {trials_per_cell: 2, sampler: random, pruner: {kind: none}}
final: {seeds: 1}
resources: {cpus_per_trial: 1}
"""


def _run(spec: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [STUDY_BIN, "run", str(spec), "--out", str(out), "--quiet", "--no-report", *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "400"},  # notes on one line each
    )


@pytest.fixture(scope="module")
def completed(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("damage")
    spec = root / "spec.yaml"
    spec.write_text(SPEC)
    out = root / "whole"
    res = _run(spec, out)
    assert res.returncode == 0, res.stderr
    return spec, out


def _copy_as_interrupted(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["status"] = "running"  # as a driver killed mid-run leaves it
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _trials(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "trials.parquet")


def test_garbled_journal_and_truncated_record_are_set_aside_and_rerun(completed, tmp_path):
    spec, whole = completed
    out = _copy_as_interrupted(whole, tmp_path / "out")
    journal = out / "optuna.journal"
    lines = journal.read_bytes().split(b"\n")
    middle = len(lines) // 2
    lines[middle] = lines[middle][:5] + b"\xff\x00garbled\x00" + lines[middle][20:]
    journal.write_bytes(b"\n".join(lines))
    final = sorted((out / "records" / "final").glob("*.json"))
    final[0].write_bytes(final[0].read_bytes()[:40])  # truncated mid-record
    res = _run(spec, out, "--resume")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    said = res.stdout + res.stderr
    assert f"from line {middle + 1} on: unreadable bytes mid-journal" in said
    assert f"records/final/{final[0].name}: unreadable, set aside" in said and "the trial runs again" in said
    assert len(list(out.glob("optuna.journal.damaged-*"))) == 1
    assert len(list((out / "records" / "final").glob("*.damaged-*"))) == 1
    # The truncated final record ran again: every record reads, the tables hold each trial once.
    assert Records(out / "records").repair() == []
    after, before = _trials(out), _trials(whole)
    assert not after.trial_id.duplicated().any()
    assert sorted(after[after.phase == "final"].trial_id) == sorted(before[before.phase == "final"].trial_id)
    assert (after.groupby("phase").size() == before.groupby("phase").size()).all()
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"


FULL_DISK = """
import errno, os, pathlib, sys

real = pathlib.Path.write_text
calls = {"n": 0}
limit, out = int(sys.argv[3]), sys.argv[2]

def write_text(self, *args, **kwargs):
    # The device fills up once `limit` records are written: every later write to the results dir fails.
    if "records" in self.parts or calls["n"] >= limit:
        calls["n"] += "records" in self.parts
        if calls["n"] > limit and str(self).startswith(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return real(self, *args, **kwargs)

pathlib.Path.write_text = write_text
from study.cli import app
sys.argv = ["study", "run", sys.argv[1], "--out", sys.argv[2], "--quiet", "--no-report"]
app()
"""


def test_full_disk_is_one_line_and_a_failed_manifest(completed, tmp_path):
    """Writes fail with ENOSPC after the first records (injected: a small tmpfs needs mount rights)."""
    spec, _ = completed
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(spec), str(out), "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on device" in errors[0].lower(), res.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"


def test_offline_download_is_one_line(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        SPEC.replace(
            "dataset: {name: mnist1d, options: {max_train: 400, max_test: 200}}",
            f"dataset: {{name: mnist, root: {tmp_path / 'data'}, download: true}}",
        )
    )
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    res = subprocess.run(
        [STUDY_BIN, "run", str(spec), "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "dataset: mnist: download failed" in line, line
    assert not (tmp_path / "out").exists()
    assert errno.ENOSPC  # (imported for the injected failure above)


def test_every_trial_of_a_phase_failed_is_exit_1_and_says_why_once(completed, tmp_path):
    spec, _ = completed
    # Every trial fails at run time (no spec check can see it): Ray workers import the hook.
    env = trialhook.env_with_hook(tmp_path / "hook", trialhook.FAIL)
    out = tmp_path / "out"
    res = subprocess.run(
        [STUDY_BIN, "run", str(spec), "--out", str(out), "--quiet", "--no-report"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert "every trial of the search phase failed (4 trials)" in errors[0]
    assert "injected: the GPU fell off the bus" in errors[0]
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
