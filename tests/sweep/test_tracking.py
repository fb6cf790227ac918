"""Trackers (study/sweep/trackers.py): one TensorBoard, MLflow and W&B run per study trial, packed or not,
read back with each tool's own reader: tensorboard's event reader, MlflowClient, and W&B's offline run
file. A tracker whose extra is missing, or an MLflow store that cannot work, is a bad input (exit 2)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from study.cli import app
from study.spec import parse_spec
from study.sweep.records import run_name, safe_name
from study.sweep.runner import RunError, check_extras, run_study
from study.sweep.trackers import Trackers, check_tracking

SPEC = """\
name: tracked
dataset: {{name: mnist1d, options: {{max_train: 600, max_test: 200}}}}
models: [mlp]
regularizers: {{ce: {{}}, label_smoothing: {{alpha: 0.1}}}}
train: {{epochs: 2, batch_size: 128, lr: {{low: 1.0e-3, high: 1.0e-2, log: true}}}}
search: {{trials_per_cell: 3, pruner: {{kind: none}}}}
final: {{seeds: 1}}
resources: {{cpus_per_trial: 1, trials_per_process: 4}}
tracking: {tracking}
"""


def test_missing_tracker_extra_names_it(tmp_path, monkeypatch):
    import sys

    # None in sys.modules is Python's own mark of a module that cannot be imported (find_spec: None).
    monkeypatch.setitem(sys.modules, "wandb", None)
    spec = parse_spec(SPEC.format(tracking="{wandb: {project: p}}"))
    with pytest.raises(
        RunError, match=r'tracking.wandb: needs wandb; install it with pip install "regstudy\[wandb\]"'
    ):
        check_extras(spec)
    path = tmp_path / "s.yaml"
    path.write_text(SPEC.format(tracking="{wandb: {project: p}}"))
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "regstudy[wandb]" in res.output and not (tmp_path / "out").exists()


def test_tracking_is_not_part_of_the_spec_hash():
    from study.spec import spec_hash

    a = parse_spec(SPEC.format(tracking="{}"))
    b = parse_spec(SPEC.format(tracking="{tensorboard: true}"))
    assert spec_hash(a) == spec_hash(b)


def _mlflow_spec(uri: str | None) -> Any:
    return parse_spec(SPEC.format(tracking=_mlflow_block(uri)))


def _mlflow_block(uri: str | None, experiment: str | None = None) -> str:
    return "{mlflow: " + json.dumps({"tracking_uri": uri, "experiment_name": experiment}) + "}"


def test_a_bad_mlflow_store_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    out = tmp_path / "out"
    assert check_tracking(_mlflow_spec(None), out) is None  # sqlite:///<out>/mlflow.db, created later
    assert check_tracking(_mlflow_spec(f"sqlite:///{tmp_path}/new/dir/m.db"), out) is None
    assert not (tmp_path / "new").exists()  # the check writes nothing
    refused = {
        "foo://bar": "unknown scheme 'foo'",
        f"sqlite:///{a_file}/m.db": f"cannot be created: {a_file} is a file",
        str(tmp_path / "mlruns"): "MLFLOW_ALLOW_FILE_STORE=true",
        "http://127.0.0.1:1": "cannot reach",
    }
    for uri, why in refused.items():
        problem = check_tracking(_mlflow_spec(uri), out)
        assert problem is not None and why in problem and "\n" not in problem, (uri, problem)
        assert problem.startswith(f"tracking.mlflow.tracking_uri: {uri!r}") or "unknown" in problem
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert check_tracking(_mlflow_spec((tmp_path / "mlruns").as_uri()), out) is None
    problem = check_tracking(_mlflow_spec((a_file / "mlruns").as_uri()), out)
    assert problem is not None and f"{a_file} is a file" in problem
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bad://x")
    assert "$MLFLOW_TRACKING_URI: unknown scheme 'bad'" in (check_tracking(_mlflow_spec(None), out) or "")


def test_study_run_refuses_a_bad_mlflow_store_before_ray_starts(tmp_path, monkeypatch, env_cache):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for n, uri in enumerate(["foo://bar", str(tmp_path / "mlruns")]):
        path = tmp_path / "s.yaml"
        path.write_text(SPEC.format(tracking=_mlflow_block(uri)))
        out = tmp_path / f"out{n}"
        res = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: tracking.mlflow.tracking_uri:"), res.output
        assert not out.exists() and not (tmp_path / "mlruns").exists()


def _record(trial_id: str, phase: str, status: str) -> dict[str, Any]:
    """A trial's record as StudyContext writes it (records/<phase>/<key>.json)."""
    rows = [{"epoch": e, "val_accuracy": 0.5 + e / 10, "train_loss": 1.0 / e, "lr": 0.01} for e in (1, 2)]
    payload = {"status": status, "best_value": 0.7, "best_epoch": 2, "epoch_rows": rows, "eval_rows": [
        {"split": "test", "condition": "clean", "severity": None, "metric": "accuracy", "value": 0.8},
        {"split": "test", "condition": "clean", "severity": None, "metric": "bin_3", "value": 0.1},
    ]}  # fmt: skip
    return {"key": f"{phase}|c|1", "trial_id": trial_id, "phase": phase, "cell_id": "mnist1d/mlp/ce/none",
            "index": 1, "config": {"train": {"lr": 0.01, "epochs": 2}, "milestones": [0.5]},
            "status": status, "epoch_rows": rows, "payload": payload, "started_at": 1.0e9,
            "ended_at": 1.0e9 + 5}  # fmt: skip


def test_a_directory_store_logs_a_trial_and_a_failing_tracker_leaves_one_note(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    spec = parse_spec(SPEC.format(tracking="{tensorboard: true, " + _mlflow_block(uri, "e")[1:]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "tensorboard").write_text("a file where TensorBoard's directory would go")
    notes: list[str] = []
    trackers = Trackers(spec, out, notes)
    trackers.trial_ended(_record("t1", "final", "completed"))
    trackers.trial_ended(_record("t2", "search", "failed"))
    trackers.close()
    assert len(notes) == 1 and notes[0].startswith(
        "tracking.tensorboard: stopped logging at trial mnist1d/mlp/ce/none/final/#1"
    )
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    by_id = {r.data.tags["trial_id"]: r for r in runs}
    assert sorted(by_id) == ["t1", "t2"]
    final, failed = by_id["t1"], by_id["t2"]
    assert final.info.run_name == "mnist1d/mlp/ce/none/final/#1" and final.info.status == "FINISHED"
    assert failed.info.status == "FAILED" and failed.data.tags["status"] == "failed"
    assert final.data.metrics["test_accuracy"] == 0.8 and "test_bin_3" not in final.data.metrics
    assert final.data.params["trial/train/lr"] == "0.01" and final.data.params["trial/milestones"] == "[0.5]"
    history = client.get_metric_history(final.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.6), (2, 0.7)]


def _wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (``run-<id>.wandb``): a 7-byte header (":W&B", magic, version),
    then LevelDB's log format: 32 KiB blocks of chunks (crc32c, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            out.append(record)
    return out


def _wandb_run(path: Path) -> dict[str, Any]:
    """An offline run's name, config, per-step history and summary, read from its run file."""
    run: dict[str, Any] = {"history": {}, "summary": {}}
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["group"] = record.run.display_name, record.run.run_group
            run["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "history":
            row = {key(i): json.loads(i.value_json) for i in record.history.item}
            run["history"][row["_step"]] = row
        elif kind == "summary":
            run["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
    return run


@pytest.fixture(scope="module")
def packed_study(tmp_path_factory, env_cache):
    """8 trials (2 cells x 3 search trials + 1 final seed) trained in packs of 4, every tracker on; the
    MLflow store is the default one (sqlite:///<out>/mlflow.db), W&B offline (never the network)."""
    pytest.importorskip("tensorboardX")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        mp.setenv(var, str(root / var.lower()))
    mp.setenv("WANDB_MODE", "offline")
    spec_path = root / "spec.yaml"
    tracking = "{tensorboard: true, mlflow: {}, wandb: {project: p, mode: offline}}"
    spec_path.write_text(SPEC.format(tracking=tracking))
    try:
        out = run_study(spec_path, out=root / "out", quiet=True, max_concurrent=1)
    finally:
        mp.undo()
    tables = {t: pd.read_parquet(out / f"{t}.parquet") for t in ("trials", "epochs", "evals")}
    assert len(tables["trials"]) == 8 and set(tables["trials"].status) == {"completed"}
    return out, tables


def _expected(trials: pd.DataFrame, epochs: pd.DataFrame, evals: pd.DataFrame):
    """Per trial: its readable name, its epoch rows and its clean test metrics (as the tables have them)."""
    for row in trials.itertuples():
        rec = {"cell_id": row.cell_id, "phase": row.phase,
               "index": int(row.optuna_number if row.phase == "search" else row.seed)}  # fmt: skip
        rows = epochs[epochs.trial_id == row.trial_id].sort_values("epoch")
        ev = evals[(evals.trial_id == row.trial_id) & (evals.split == "test") & (evals.condition == "clean")]
        test = {f"test_{m}": v for m, v in zip(ev.metric, ev.value, strict=True) if not m.startswith("bin_")}
        yield run_name(rec), row, rows, test


CURVES = ("val_accuracy", "val_nll", "val_ece", "train_loss", "train_acc", "lr")


@pytest.mark.slow
def test_tensorboard_has_one_run_per_packed_trial(packed_study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    out, t = packed_study
    dirs = sorted(p.name for p in (out / "tensorboard").iterdir())
    expected = list(_expected(t["trials"], t["epochs"], t["evals"]))
    assert dirs == sorted(safe_name(name.replace("#", "")) for name, *_ in expected)
    finals = 0
    for name, row, rows, test in expected:
        acc = EventAccumulator(str(out / "tensorboard" / safe_name(name.replace("#", ""))))
        acc.Reload()
        for curve in CURVES:
            got = acc.Scalars(curve)
            assert [e.step for e in got] == rows.epoch.tolist(), (name, curve)
            assert [e.value for e in got] == pytest.approx(rows[curve].tolist(), rel=1e-6), (name, curve)
        assert acc.Scalars("objective")[-1].value == pytest.approx(row.best_value, rel=1e-6)
        for metric, value in test.items():
            assert acc.Scalars(metric)[-1].value == pytest.approx(value, rel=1e-6), (name, metric)
        finals += bool(test)
        assert bool(test) == (row.phase == "final")
        assert not test or {"test_accuracy", "test_ece", "test_nll"} <= set(test)
        # The HParams session: the trial's hyperparameters and id.
        start = acc.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG]
        hparams = metadata.parse_session_start_info_plugin_data(start).hparams
        assert hparams["trial_id"].string_value == row.trial_id
        assert hparams["trial/train/lr"].number_value == pytest.approx(row.param_lr)
    assert finals == 2


@pytest.mark.slow
def test_mlflow_has_one_run_per_packed_trial(packed_study):
    from mlflow import MlflowClient

    out, t = packed_study
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_name = {r.info.run_name: r for r in runs}
    expected = list(_expected(t["trials"], t["epochs"], t["evals"]))
    assert len(runs) == 8 and sorted(by_name) == sorted(name for name, *_ in expected)
    for name, row, rows, test in expected:
        run = by_name[name]
        tags = run.data.tags
        assert (tags["trial_id"], tags["phase"], tags["study"]) == (row.trial_id, row.phase, "tracked")
        assert run.info.status == "FINISHED"
        assert float(run.data.params["trial/train/lr"]) == pytest.approx(row.param_lr)
        for curve in CURVES:
            history = sorted(client.get_metric_history(run.info.run_id, curve), key=lambda m: m.step)
            assert [m.step for m in history] == rows.epoch.tolist(), (name, curve)
            assert [m.value for m in history] == pytest.approx(rows[curve].tolist(), rel=1e-9)
        assert run.data.metrics["objective"] == pytest.approx(row.best_value)
        got = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
        assert got == pytest.approx(test) and (row.phase == "search") == (not got)


@pytest.mark.slow
def test_wandb_has_one_offline_run_per_packed_trial(packed_study):
    out, t = packed_study
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    runs = {r["name"]: r for r in map(_wandb_run, files)}
    expected = list(_expected(t["trials"], t["epochs"], t["evals"]))
    assert len(files) == 8 and sorted(runs) == sorted(name for name, *_ in expected)
    for name, row, rows, test in expected:
        run = runs[name]
        assert run["group"] == "tracked" and run["config"]["trial_id"] == row.trial_id
        assert run["config"]["trial/train/lr"] == pytest.approx(row.param_lr)
        assert sorted(run["history"]) == rows.epoch.tolist()
        for curve in CURVES:
            got = [run["history"][e][curve] for e in rows.epoch]
            assert got == pytest.approx(rows[curve].tolist(), rel=1e-9), (name, curve)
        assert run["summary"]["objective"] == pytest.approx(row.best_value)
        got = {k: v for k, v in run["summary"].items() if k.startswith("test_")}
        assert got == pytest.approx(test)
