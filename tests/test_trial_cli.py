"""`study trial`: JSON output, bad input (exit 2, one line, no traceback), kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from study.cli import app

STUDY = str(Path(sys.executable).with_name("study"))


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("REGSTUDY_CACHE", str(tmp_path / "cache"))
    # One intra-op thread: the same arithmetic in every run, and no oversubscription on a shared machine.
    return {**os.environ, "REGSTUDY_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def run_study(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [STUDY, "trial", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_json_prints_exactly_one_object(env):
    proc = run_study(["--epochs", "2", "--batch-size", "128", "--noise", "symmetric:0.2", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["status"] == "completed" and out["epochs"] == 2
    assert out["config"]["noise_kind"] == "symmetric" and out["config"]["noise_rate"] == 0.2
    assert 0.1 < out["realized_noise_rate"] < 0.3
    for name in ("accuracy", "nll", "ece", "ece_ts", "temperature", "d_within", "r2", "memorisation_rate"):
        assert isinstance(out["metrics"][name], float), name
    assert 0.0 <= out["metrics"]["accuracy"] <= 1.0


BAD_INPUTS = [
    (["--dataset", "nope"], "unknown dataset"),
    (["--model", "nope"], "unknown model"),
    (["--dataset", "digits", "--model", "cnn1d"], "needs 1-D signals"),
    (["--regularizer", "label_smoothing", "--param", "alpha=1.0"], "alpha"),
    (["--regularizer", "nope"], "nope"),
    (["--param", "alpha"], "key=value"),
    (["--noise", "symmetric:1.5"], "rate"),
    (["--noise", "gaussian:0.2"], "gaussian"),
    (["--noise", "symmetric"], "KIND:RATE"),
    (["--optimizer", "lion"], "optimizer"),
    (["--device", "tpu9"], "--device"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(env, args, needle):
    result = CliRunner().invoke(app, ["trial", *args, "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # no other exception escaped
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert needle in err
    assert result.stdout.strip() == ""


def test_missing_dataset_files_say_how_to_download(env, tmp_path):
    result = CliRunner().invoke(
        app, ["trial", "--dataset", "cifar10", "--model", "resnet20", "--root", str(tmp_path / "nodata")]
    )
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1
    assert str(tmp_path / "nodata") in err and "download" in err
    assert not (tmp_path / "nodata").exists() or not any((tmp_path / "nodata").iterdir())


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=False)["epoch"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(env, tmp_path):
    args = ["--epochs", "5", "--batch-size", "64", "--json"]
    ck = tmp_path / "killed"
    proc = subprocess.Popen(
        [STUDY, "trial", *args, "--checkpoint-dir", str(ck)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while _checkpoint_epoch(ck / "checkpoint.pt") < 2:
            assert proc.poll() is None, "the trial ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint of epoch 2 within 90 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    killed_at = _checkpoint_epoch(ck / "checkpoint.pt")
    assert proc.returncode == -signal.SIGKILL and 2 <= killed_at < 5
    resumed = run_study([*args, "--checkpoint-dir", str(ck)], env)
    straight = run_study([*args, "--checkpoint-dir", str(tmp_path / "straight")], env)
    assert resumed.returncode == 0 and straight.returncode == 0, resumed.stderr + straight.stderr
    a, b = json.loads(resumed.stdout), json.loads(straight.stdout)
    assert a["status"] == b["status"] == "completed" and a["epochs"] == b["epochs"] == 5
    assert a["metrics"] == b["metrics"]
    assert a["final_train_acc"] == b["final_train_acc"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_bad_input(env):
    result = CliRunner().invoke(app, ["trial", "--device", "cuda", "--epochs", "1"])
    assert result.exit_code == 2 and "no CUDA device" in result.stderr
