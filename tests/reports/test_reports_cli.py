"""`study report|query|ls` through typer's CliRunner: numbers, plots, and bad inputs (exit 2, no change)."""

from __future__ import annotations

import hashlib
import io
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from reports.build import SCHEMA_KEY, build_summary, load_study, read_table
from reports.plots import write_plots
from reports.synthetic import make_synthetic_study
from study.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def frames_and_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("root") / "study1"
    frames = make_synthetic_study(out, models=("mlp",), seeds=3, search_trials=5)
    return frames, out


def _hashes(path):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def _assert_one_line_exit2(result):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")


def test_query_numbers(frames_and_dir):
    frames, out = frames_and_dir
    sql = "select regularizer, avg(value) as v from evals join trials using (trial_id) where metric='ece' "
    sql += "group by 1"
    result = runner.invoke(app, ["query", str(out), sql, "--json"])
    assert result.exit_code == 0, result.output
    got = {r["regularizer"]: r["v"] for r in json.loads(result.stdout)}
    ev, tr = frames["evals"], frames["trials"]
    expected = ev[ev.metric == "ece"].merge(tr, on="trial_id").groupby("regularizer")["value"].mean()
    assert got == pytest.approx(expected.to_dict(), rel=1e-12)
    csv = runner.invoke(app, ["query", str(out), sql + " order by 1", "--csv"])
    assert pd.read_csv(io.StringIO(csv.stdout)).set_index("regularizer")["v"].to_dict() == pytest.approx(
        expected.to_dict()
    )
    rich = runner.invoke(app, ["query", str(out), "select count(*) as n from epochs"])
    assert rich.exit_code == 0 and str(len(frames["epochs"])) in rich.stdout


def _finished(out):
    """A synthetic study as a finished run leaves it: tables, summary.parquet (every reference), plots."""
    make_synthetic_study(out, models=("mlp",), seeds=3, search_trials=5)
    build_summary(out)
    write_plots(load_study(out), out / "plots")
    (out / "spec.yaml").write_text("name: synthetic\nsearch: {trials_per_cell: 5, sampler: tpe}\n")
    return out


def _state(path):
    """Every file's hash and mtime, and every directory's mtime (a new file changes its directory's)."""
    files = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in path.rglob("*")
             if p.is_file()}  # fmt: skip
    return files, {p: p.stat().st_mtime_ns for p in [path, *path.rglob("*")] if p.is_dir()}


def test_report_changes_no_file_of_the_study(tmp_path):
    out = _finished(tmp_path / "study")
    before = _state(out)
    variants = [
        [], ["--reference", "label_smoothing"], ["--all-pairs"], ["--compare", "maxsup:label_smoothing"],
        ["--full"], ["--full", "--reference", "maxsup", "--all-pairs", "--compare", "ce:maxsup"],
    ]  # fmt: skip
    for fmt in ("rich", "markdown", "latex"):
        for extra in variants:
            result = runner.invoke(app, ["report", str(out), "--format", fmt, *extra])
            assert result.exit_code == 0, (fmt, extra, result.output)
            assert result.stdout.strip()
    assert _state(out) == before


def test_report_writes_plots_only_where_told(tmp_path):
    out = _finished(tmp_path / "study")
    before = _state(out)
    result = runner.invoke(
        app, ["report", str(out), "--plots", str(tmp_path / "figs"), "--reference", "maxsup"]
    )
    assert result.exit_code == 0, result.output
    assert _state(out) == before
    pngs = sorted((tmp_path / "figs").glob("*.png"))
    assert {p.name for p in pngs} == {p.name for p in (out / "plots").glob("*.png")}
    from PIL import Image

    for p in pngs:
        with Image.open(p) as im:
            im.verify()
    # The old flag is still accepted and writes nothing.
    assert runner.invoke(app, ["report", str(out), "--no-plots"]).exit_code == 0 and _state(out) == before


def test_ls(frames_and_dir):
    _, out = frames_and_dir
    result = runner.invoke(app, ["ls", str(out.parent)])
    assert result.exit_code == 0 and "synthetic" in result.stdout and "completed" in result.stdout


def test_ls_shows_when_the_study_last_ran_not_when_a_file_changed(tmp_path):
    import datetime
    import os

    from reports.query import list_studies

    out = tmp_path / "s"
    make_synthetic_study(out, models=("mlp",), noise_settings=("none",), search_trials=2, seeds=2)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(started_at=1.70e9, resumed_at=1.71e9, ended_at=1.72e9, phases=[["running", 1.70e9]])
    (out / "manifest.json").write_text(json.dumps(manifest))
    os.utime(out / "trials.parquet", (1.8e9, 1.8e9))  # a file touched later (as reports used to)
    (row,) = list_studies(tmp_path)
    assert row["last_ran"] == 1.72e9 and row["last_modified"] == 1.8e9
    shown = datetime.datetime.fromtimestamp(1.72e9).strftime("%Y-%m-%d %H:%M")
    result = runner.invoke(app, ["ls", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0 and shown in result.stdout and "last ran" in result.stdout


def test_query_prints_full_numbers_and_timestamps_when_piped(frames_and_dir):
    frames, out = frames_and_dir
    result = runner.invoke(
        app, ["query", str(out), "select trial_id, value from evals order by trial_id, value"]
    )
    assert result.exit_code == 0, result.output  # CliRunner's stdout is a pipe, not a terminal
    lines = result.stdout.splitlines()
    assert len(lines) == len(frames["evals"]) + 1 and "…" not in result.stdout
    got = [float(line.split()[1]) for line in lines[1:]]
    assert got == frames["evals"].sort_values(["trial_id", "value"])["value"].tolist()  # every digit
    schema = pq.read_schema(out / "trials.parquet")
    assert schema.field("started_at").type == pa.timestamp("us", tz="UTC")
    sql = "select trial_id, started_at, typeof(started_at) as t from trials order by trial_id"
    rows = json.loads(runner.invoke(app, ["query", str(out), sql, "--json"]).stdout)
    assert {r["t"] for r in rows} == {"TIMESTAMP WITH TIME ZONE"}
    seconds = [pd.Timestamp(r["started_at"]).timestamp() for r in rows]
    assert seconds == pytest.approx(frames["trials"].sort_values("trial_id")["started_at"].tolist(), abs=1e-6)


def _corrupt_truncated(d):
    data = (d / "evals.parquet").read_bytes()
    (d / "evals.parquet").write_bytes(data[: len(data) // 3])


def _corrupt_newer(d):
    table = pq.read_table(d / "trials.parquet")
    pq.write_table(table.replace_schema_metadata({SCHEMA_KEY: b"2.0"}), d / "trials.parquet")


@pytest.mark.parametrize("damage", [None, _corrupt_truncated, _corrupt_newer])
def test_bad_results_dir_exit2_unchanged(tmp_path, damage):
    d = tmp_path / "s"
    make_synthetic_study(d, models=("mlp",), noise_settings=("none",), search_trials=2, seeds=2)
    if damage is None:
        d = tmp_path / "empty"
        d.mkdir()
        (d / "notes.txt").write_text("not a study")
    else:
        damage(d)
    before = _hashes(d)
    for args in (
        ["report", str(d)],
        ["query", str(d), "select count(*) from evals join trials using (trial_id)"],
    ):
        _assert_one_line_exit2(runner.invoke(app, args))
        assert _hashes(d) == before and sorted(p.name for p in d.iterdir()) == sorted(p.name for p in before)


def test_sql_error_and_bad_args(frames_and_dir):
    _, out = frames_and_dir
    before = _hashes(out)
    _assert_one_line_exit2(runner.invoke(app, ["query", str(out), "select nope from evals [x]"]))
    _assert_one_line_exit2(runner.invoke(app, ["query", str(out), "select 1", "--csv", "--json"]))
    _assert_one_line_exit2(runner.invoke(app, ["report", str(out), "--format", "html"]))
    _assert_one_line_exit2(runner.invoke(app, ["ls", str(out / "missing")]))
    assert _hashes(out) == before


def test_partial_study_flagged(tmp_path):
    make_synthetic_study(
        tmp_path, models=("mlp",), noise_settings=("none",), search_trials=2, status="running"
    )
    result = runner.invoke(app, ["report", str(tmp_path), "--no-plots", "--format", "markdown"])
    assert result.exit_code == 0 and "PARTIAL RESULTS" in result.stdout


def test_schema_without_pyarrow_metadata_is_read(tmp_path):
    pq.write_table(pa.table({"trial_id": ["a"], "value": [1.0]}), tmp_path / "evals.parquet")
    result = runner.invoke(app, ["query", str(tmp_path), "select sum(value) as s from evals", "--json"])
    assert json.loads(result.stdout) == [{"s": 1.0}]


TINY = """\
name: tiny
dataset: {name: mnist1d, options: {max_train: 600, max_test: 200}}
models: [mlp]
regularizers: {ce: {}, label_smoothing: {alpha: 0.2}, maxsup: {alpha: 0.2}}
train: {epochs: 2, lr: 0.01}
search: {trials_per_cell: 1, pruner: {kind: none}}
final: {seeds: 2}
evaluate: {attacks: [pgd_ce], eps: [0.1], max_samples: 100}
"""


@pytest.mark.slow
def test_a_finished_run_is_unchanged_by_every_report(tmp_path):
    """The real path: `study run` writes summary.parquet (every reference) and the plots; no report
    variant changes a byte or an mtime of what it left."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    out = tmp_path / "out"
    env = {**os.environ, "REGSTUDY_CACHE": str(tmp_path / "cache")}
    study_bin = str(Path(sys.executable).with_name("study"))
    res = subprocess.run([study_bin, "run", str(spec), "--out", str(out), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Findings vs CE" in res.stdout
    summary = read_table(out, "summary")
    regs = {"ce", "label_smoothing", "maxsup"}
    assert set(summary["reference"]) == regs and set(summary["regularizer"]) == regs
    assert {p.name.split("_")[0] for p in (out / "plots").glob("*.png")} >= {
        "accuracy",
        "forest",
        "reliability",
    }
    before = _state(out)
    for fmt in ("rich", "markdown", "latex"):
        for extra in (
            [],
            ["--full", "--reference", "maxsup", "--all-pairs", "--compare", "label_smoothing:ce"],
        ):
            result = runner.invoke(app, ["report", str(out), "--format", fmt, *extra])
            assert result.exit_code == 0, result.output
    assert _state(out) == before
