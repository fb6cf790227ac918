"""Trackers through Ray Tune's own logger callbacks, in a tiny real study: TensorBoard event files (read
back with tensorboard's event reader) and an MLflow local file store, one run per trial named
``cell/phase/#n`` with the trial's params and metrics. A tracker whose extra is missing is a bad input."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from typer.testing import CliRunner

from study.cli import app
from study.spec import parse_spec
from study.sweep.runner import RunError, check_extras, run_study

SPEC = """\
name: tracked
dataset: {{name: mnist1d, options: {{max_train: 600, max_test: 200}}}}
models: [mlp]
regularizers: [ce]
train: {{epochs: 2, batch_size: 128, lr: {{low: 1.0e-3, high: 1.0e-2, log: true}}}}
search: {{trials_per_cell: 2, pruner: {{kind: none}}}}
final: {{seeds: 1}}
tracking: {tracking}
"""


def test_missing_tracker_extra_names_it(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: nothing is missing")
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


@pytest.mark.slow
def test_tensorboard_and_mlflow_runs_per_trial(tmp_path, monkeypatch):
    pytest.importorskip("tensorboardX")
    mlflow = pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # A local directory store: MLflow 3 keeps it behind this switch (a sqlite:// URI needs full mlflow).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC.format(tracking=f"{{tensorboard: true, mlflow: {{tracking_uri: '{uri}'}}}}"))
    os.environ.setdefault("REGSTUDY_CACHE", str(tmp_path / "cache"))
    out = run_study(spec_path, out=tmp_path / "out", quiet=True, max_concurrent=1)
    trials = pd.read_parquet(out / "trials.parquet")
    epochs = pd.read_parquet(out / "epochs.parquet")
    evals = pd.read_parquet(out / "evals.parquet")
    assert len(trials) == 3

    # TensorBoard: one directory of event files per trial, its per-epoch validation metrics.
    dirs = sorted(p.parent for p in (out / "ray").glob("trials-*/*/events.out.tfevents.*"))
    assert len(dirs) == 3
    names = sorted(d.name.rsplit("_", 1)[0] for d in dirs)
    assert names == [
        "mnist1d_mlp_ce_none_final_1",
        "mnist1d_mlp_ce_none_search_0",
        "mnist1d_mlp_ce_none_search_1",
    ]
    val = {}
    for d in dirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        val[d.name.rsplit("_", 1)[0]] = [(e.step, e.value) for e in acc.Scalars("ray/tune/val_accuracy")]
    for row in trials.itertuples():
        rows = epochs[epochs.trial_id == row.trial_id].sort_values("epoch")
        index = int(row.optuna_number if row.phase == "search" else row.seed)
        got = val[f"mnist1d_mlp_ce_none_{row.phase}_{index}"]
        assert [s for s, _ in got] == rows.epoch.tolist()
        assert [v for _, v in got] == pytest.approx(rows.val_accuracy.tolist(), rel=1e-6)

    # MLflow: one run per trial in the study's experiment, readable names, params and metrics.
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tracked"], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == [
        "mnist1d/mlp/ce/none/final/#1",
        "mnist1d/mlp/ce/none/search/#0",
        "mnist1d/mlp/ce/none/search/#1",
    ]
    for row in trials.itertuples():
        index = int(row.optuna_number if row.phase == "search" else row.seed)
        run = by_name[f"mnist1d/mlp/ce/none/{row.phase}/#{index}"]
        assert run.info.status == "FINISHED" and run.data.tags["study"] == "tracked"
        assert float(run.data.params["trial/train/lr"]) == pytest.approx(row.param_lr)
        assert run.data.metrics["objective"] == pytest.approx(row.best_value)
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
        assert len(history) == row.epochs
    final = trials[trials.phase == "final"].iloc[0]
    accuracy = evals[
        (evals.trial_id == final.trial_id) & (evals.metric == "accuracy") & (evals.condition == "clean")
    ]
    run = by_name["mnist1d/mlp/ce/none/final/#1"]
    assert run.data.metrics["test_accuracy"] == pytest.approx(
        float(accuracy[accuracy.split == "test"].value.iloc[0])
    )
