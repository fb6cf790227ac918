"""`study trial`: JSON output, bad input (exit 2, one line, no traceback), kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import studygate
import torch
from typer.testing import CliRunner

from study.cli import app

STUDY = str(Path(sys.executable).with_name("study"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One cache per module: MNIST-1D is generated once, not once per subprocess test.
    return tmp_path_factory.mktemp("regstudy_cache")


@pytest.fixture()
def env(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("REGSTUDY_CACHE", str(cache_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # in-process runs leave this process's threads alone
    # One intra-op thread: the same arithmetic in every run, and no oversubscription on a shared machine.
    return {**os.environ, "REGSTUDY_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}


def run_study(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [STUDY, "trial", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_json_prints_exactly_one_object(env):
    # In-process for speed; the subprocess tests below parse a real process's whole stdout as JSON too.
    result = CliRunner().invoke(
        app, ["trial", "--epochs", "2", "--batch-size", "128", "--noise", "symmetric:0.2", "--json"]
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["status"] == "completed" and out["epochs"] == 2
    assert out["config"]["noise"]["kind"] == "symmetric" and out["config"]["noise"]["rate"] == 0.2
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
    # Not YAML: a traceback before the fix.
    (["--regularizer", "label_smoothing", "--param", "alpha=[0.1"], "--param alpha: '[0.1' is not a value"),
    (["--regularizer", "label_smoothing", "--param", "alpha=.nan"], "alpha must be in"),
    (["--lr", "0"], "--lr: must be a finite number > 0"),
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
        return int(torch.load(path, weights_only=True)["epoch"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(env, tmp_path):
    # The study gate (tests/studygate.py) holds the trial at the start of its epoch 3, epoch 2
    # checkpointed: it is killed there, however fast or busy the machine. Released, it is plain CE.
    ck = tmp_path / "killed"
    gate = tmp_path / "gate"
    env = {**env, **studygate.arm(gate, records=str(ck / "checkpoint.pt"), after=1, hold_from_epoch=2)}
    args = ["--regularizer", "studygate:ce", "--epochs", "6", "--batch-size", "128", "--json"]
    proc = subprocess.Popen(
        [STUDY, "trial", *args, "--checkpoint-dir", str(ck)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert [h["epochs_done"] for h in studygate.wait_until_held(gate, proc, timeout_s=90)] == [2]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    studygate.release(gate)
    killed_at = _checkpoint_epoch(ck / "checkpoint.pt")
    assert proc.returncode == -signal.SIGKILL and killed_at == 2
    resumed = run_study([*args, "--checkpoint-dir", str(ck)], env)
    straight = run_study([*args, "--checkpoint-dir", str(tmp_path / "straight")], env)
    assert resumed.returncode == 0 and straight.returncode == 0, resumed.stderr + straight.stderr
    a, b = json.loads(resumed.stdout), json.loads(straight.stdout)
    assert a["status"] == b["status"] == "completed" and a["epochs"] == b["epochs"] == 6
    assert a["metrics"] == b["metrics"]
    assert a["final_train_acc"] == b["final_train_acc"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_bad_input(env):
    result = CliRunner().invoke(app, ["trial", "--device", "cuda", "--epochs", "1"])
    assert result.exit_code == 2 and "no CUDA device" in result.stderr


@pytest.mark.slow
def test_default_cnn1d_reaches_90_percent_in_30_epochs(env):
    # The acceptance command (about 15-30 s here); MNIST-1D paper ConvBase: ~92-94%.
    proc = run_study(["--dataset", "mnist1d", "--model", "cnn1d", "--regularizer", "ce", "--json"], env, 300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["epochs"] == 30 and out["metrics"]["accuracy"] >= 0.90
