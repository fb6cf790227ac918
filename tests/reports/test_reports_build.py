"""reports.build: typed atomic Parquet I/O, schema version, load_study."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reports.build import (
    SCHEMA_KEY,
    SCHEMA_VERSION,
    ResultsError,
    build_summary,
    load_study,
    read_table,
    write_results,
    write_table,
)


def _trial(i: int, **kw) -> dict:
    row = dict(study="s", phase="search", cell_id="c", trial_id=f"t{i}", dataset="d", model="m",
               regularizer="ce", status="completed", seed=i, noise_setting="none")  # fmt: skip
    return row | kw


def test_roundtrip_types_union_and_metadata(tmp_path):
    rows = [_trial(0, param_lr=0.1, param_depth=2), _trial(1, param_opt="sgd", epochs=3, best_value=1)]
    path = write_table(tmp_path, "trials", rows)
    df = read_table(tmp_path, "trials")
    assert list(df["trial_id"]) == ["t0", "t1"]
    # declared types hold whatever the batch contained: best_value int 1 -> float, missing -> null
    assert df["best_value"].dtype == np.float64 and df["best_value"].iloc[1] == 1.0
    assert np.isnan(df["best_value"].iloc[0])
    assert df["param_depth"].iloc[0] == 2 and pd.isna(df["param_depth"].iloc[1])
    assert df["param_opt"].iloc[1] == "sgd" and pd.isna(df["param_opt"].iloc[0])
    schema = pq.read_schema(path)
    assert schema.field("strength").type == pa.float64() and schema.field("optuna_number").type == pa.int64()
    assert schema.metadata[SCHEMA_KEY] == SCHEMA_VERSION.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trials.parquet"]  # no temp file left


def test_epoch_terms_union_null_filled(tmp_path):
    rows = [
        {"trial_id": "a", "epoch": 1, "term_ce": 1.0},
        {"trial_id": "b", "epoch": 1, "term_regularization": 0.5},
    ]
    df = read_table(write_table(tmp_path, "epochs", rows).parent, "epochs")
    assert df["term_ce"].tolist()[0] == 1.0 and np.isnan(df["term_ce"].tolist()[1])
    assert np.isnan(df["term_regularization"].iloc[0]) and df["term_regularization"].iloc[1] == 0.5


def test_write_rejects_bad_values_and_changes_nothing(tmp_path):
    with pytest.raises(ValueError, match="status must be one of"):
        write_results(tmp_path, trials=[_trial(0, status="done")], epochs=[], evals=[])
    with pytest.raises(ValueError, match="epochs.epoch must hold int64"):
        write_table(tmp_path, "epochs", [{"trial_id": "a", "epoch": 1.5}])
    with pytest.raises(ValueError, match="name must be one of"):
        write_table(tmp_path, "nope", [])
    assert list(tmp_path.iterdir()) == []


def test_read_errors_are_results_errors(tmp_path):
    with pytest.raises(ResultsError, match="missing"):
        read_table(tmp_path, "trials")
    path = write_table(tmp_path, "trials", [_trial(i) for i in range(50)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ResultsError, match="corrupted or truncated"):
        read_table(tmp_path, "trials")
    table = pa.table({"trial_id": ["x"]}).replace_schema_metadata({SCHEMA_KEY: b"2.0"})
    pq.write_table(table, path)
    with pytest.raises(ResultsError, match="newer"):
        read_table(tmp_path, "trials")
    table = table.replace_schema_metadata({SCHEMA_KEY: b"1.7"})  # newer minor: still readable
    pq.write_table(table, path)
    assert read_table(tmp_path, "trials")["trial_id"].tolist() == ["x"]


def test_load_study_partial_and_not_a_study(tmp_path):
    with pytest.raises(ResultsError, match="not a study"):
        load_study(tmp_path)
    with pytest.raises(ResultsError, match="not a directory"):
        load_study(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text(json.dumps({"study": "x", "status": "running"}))
    study = load_study(tmp_path)
    assert study.partial and study.name == "x" and len(study.trials) == 0 and "param_lr" not in study.trials
    (tmp_path / "manifest.json").write_text(json.dumps({"study": "x", "status": "completed"}))
    assert not load_study(tmp_path).partial
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ResultsError, match="manifest"):
        load_study(tmp_path)


def test_build_summary_writes_summary(tmp_path):
    from reports.synthetic import make_synthetic_study

    make_synthetic_study(tmp_path, models=("mlp",), noise_settings=("none",), search_trials=3)
    summary = build_summary(tmp_path)
    again = read_table(tmp_path, "summary")
    assert len(again) == len(summary) > 0
    assert set(again["regularizer"]) == {"ce", "label_smoothing", "maxsup"}
