"""Results that combine: the long-format params table, the projections view, `study query` over several
results directories (a `study` column in every view), and the manifest's git state."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from typer.testing import CliRunner

from reports.build import SCHEMA_KEY, SCHEMA_VERSION, params_long, read_table, write_results
from reports.query import run_query
from study.cli import app

RAMP = json.dumps({"start": 0.1, "end": 0.2, "schedule": "linear"})


def _study(path: Path, name: str, params: list[dict], projections: bool = False) -> None:
    trials = [
        {"study": name, "trial_id": f"t{i}", "cell_id": f"c{i}", "phase": "final", "status": "completed",
         "regularizer": "maxsup", "metric": "val_accuracy", **p}
        for i, p in enumerate(params)
    ]  # fmt: skip
    evals = [{"trial_id": f"t{i}", "split": "test", "condition": "clean", "metric": "accuracy",
              "value": 0.5 + i} for i in range(len(params))]  # fmt: skip
    proj = [{"trial_id": "t0", "cls": 1, "x": 0.25, "y": -1.0}] if projections else None
    write_results(path, trials=trials, epochs=[], evals=evals, projections=proj)
    (path / "manifest.json").write_text(json.dumps({"study": name, "status": "completed"}))


def test_params_long_values_and_table(tmp_path):
    _study(
        tmp_path, "a", [{"param_lr": 0.01, "param_alpha": RAMP}, {"param_lr": 0.02, "param_shortcut": "B"}]
    )
    df = read_table(tmp_path, "params").sort_values(["trial_id", "name"]).reset_index(drop=True)
    rows = [
        (r.trial_id, r.name, r.value, None if pd.isna(r.value_text) else r.value_text)
        for r in df.itertuples()
    ]
    assert rows[0] == ("t0", "alpha", 0.1, RAMP)  # a ramp: its start value, the JSON as text
    assert rows[1] == ("t0", "lr", 0.01, None)
    assert rows[2] == ("t1", "lr", 0.02, None)
    assert rows[3][:2] == ("t1", "shortcut") and math.isnan(rows[3][2]) and rows[3][3] == "B"
    assert len(rows) == 4  # absent parameters have no row
    meta = pq.read_schema(tmp_path / "params.parquet").metadata
    assert meta[SCHEMA_KEY] == SCHEMA_VERSION.encode()
    assert params_long([{"trial_id": "x", "param_adaptive": True, "param_k": 3}]) == [
        {"trial_id": "x", "name": "adaptive", "value": 1.0, "value_text": None},
        {"trial_id": "x", "name": "k", "value": 3.0, "value_text": None},
    ]


def test_projections_and_params_are_query_views(tmp_path):
    _study(tmp_path, "a", [{"param_lr": 0.01}], projections=True)
    df = run_query(tmp_path, "select p.name, p.value, j.x from params p join projections j using (trial_id)")
    assert df.to_dict("records") == [{"name": "lr", "value": 0.01, "x": 0.25}]


def test_query_over_several_studies_stacks_and_labels(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _study(a, "first", [{"param_lr": 0.01}, {"param_lr": 0.03}])
    _study(b, "second", [{"param_alpha": RAMP}])  # another parameter set: stacks by name
    sql = (
        "select t.study, t.trial_id, e.value, p.name, p.value as pv from trials t "
        "join evals e using (study, trial_id) join params p using (study, trial_id) order by 1, 2"
    )
    df = run_query([a, b], sql)
    got = [tuple(r) for r in df.itertuples(index=False)]
    assert got == [
        ("first", "t0", 0.5, "lr", 0.01),
        ("first", "t1", 1.5, "lr", 0.03),
        ("second", "t0", 0.5, "alpha", 0.1),
    ]
    cols = run_query([a, b], "select * from trials limit 0").columns
    assert "param_lr" in cols and "param_alpha" in cols and "objective_metric" in cols
    # Through the CLI: the SQL is the last argument; one directory keeps the old form and columns.
    res = CliRunner().invoke(
        app, ["query", str(a), str(b), "select study, count(*) n from evals group by 1 order by 1", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == [{"study": "first", "n": 2}, {"study": "second", "n": 1}]
    one = CliRunner().invoke(app, ["query", str(a), "select * from evals limit 1", "--json"])
    assert one.exit_code == 0 and "study" not in json.loads(one.output)[0]
    # Two directories holding the same study name: the path tells them apart.
    c = tmp_path / "c"
    _study(c, "first", [{"param_lr": 0.5}])
    names = run_query([a, c], "select distinct study from trials order by 1")["study"].tolist()
    assert names == sorted([str(a), str(c)])


def test_query_cli_bad_inputs_exit_2(tmp_path):
    _study(tmp_path / "a", "a", [{"param_lr": 0.01}])
    res = CliRunner().invoke(app, ["query", "select 1"])
    assert res.exit_code == 2 and "DIR" in res.output
    res = CliRunner().invoke(app, ["query", str(tmp_path / "a"), str(tmp_path / "nope"), "select 1"])
    assert res.exit_code == 2 and "nope: not a directory" in res.output


def test_manifest_git_state_is_the_users_working_directory(tmp_path):
    from study.sweep.provenance import git_state

    assert git_state(tmp_path)["git_sha"] is None  # not a repository
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }

    def run(*a: str) -> subprocess.CompletedProcess:
        env_ = env | {"PATH": "/usr/bin:/bin"}
        return subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, env=env_)

    run("init", "-q")
    (tmp_path / "spec.yaml").write_text("name: x\n")
    run("add", "spec.yaml")
    run("commit", "-qm", "spec")
    sha = run("rev-parse", "HEAD").stdout.decode().strip()
    state = git_state(tmp_path)
    assert state["git_sha"] == sha and len(sha) == 40 and state["git_dirty"] is False
    (tmp_path / "spec.yaml").write_text("name: y\n")
    assert git_state(tmp_path)["git_dirty"] is True
    assert state["package_git_sha"] != sha
