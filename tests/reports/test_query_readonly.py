"""`study query` is read-only: a statement that would write, attach or load anything is refused on one line
(exit 2) and no file of the results directory changes (every file hashed before and after)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reports.synthetic import make_synthetic_study
from study.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("root") / "study1"
    make_synthetic_study(out, models=("mlp",), noise_settings=("none",), seeds=2, search_trials=2)
    return out


def _tree(path: Path) -> dict[str, str]:
    """Every file and directory under ``path`` (hidden ones too) with the hash of its bytes."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


HOSTILE = [
    "COPY (SELECT 1 AS a) TO '{out}/trials.parquet'",
    "COPY (SELECT 1 AS a) TO '{out}/trials.parquet' (USE_TMP_FILE false)",
    "COPY (SELECT 1 AS a) TO '{out}/manifest.json' (FORMAT csv)",
    "COPY trials TO 'trials.csv'",  # relative: the working directory is the results dir
    "COPY (SELECT * FROM evals) TO '{out}/evals.parquet' (FORMAT parquet, USE_TMP_FILE false)",
    "EXPORT DATABASE '{out}/export'",
    "ATTACH '{out}/new.duckdb' AS x",
    "ATTACH '{out}/trials.parquet' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET log_query_path = '{out}/queries.log'",
    "PRAGMA enable_profiling = 'json'",
    "CREATE TABLE t AS SELECT * FROM trials",
    "SELECT 1; COPY (SELECT 1) TO '{out}/x.csv'",
    "SELECT * FROM read_csv('{out}/manifest.json')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('{out}/*')",
]


@pytest.mark.parametrize("sql", HOSTILE)
def test_hostile_query_is_refused_and_changes_nothing(study_dir: Path, sql: str, monkeypatch):
    monkeypatch.chdir(study_dir)
    before = _tree(study_dir)
    res = runner.invoke(app, ["query", str(study_dir), sql.format(out=study_dir)])
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error:"), line
    assert _tree(study_dir) == before
    # and the study still reads: the views are intact
    ok = runner.invoke(app, ["query", str(study_dir), "select count(*) as n from trials", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)[0]["n"] > 0


def test_write_statements_are_named(study_dir: Path):
    res = runner.invoke(app, ["query", str(study_dir), f"COPY trials TO '{study_dir}/t.csv'"])
    assert res.exit_code == 2
    assert "read-only" in res.stderr and "COPY" in res.stderr


@pytest.mark.parametrize(
    "sql",
    [
        "WITH a AS (SELECT trial_id FROM trials) SELECT count(*) AS n FROM a",
        "DESCRIBE trials",
        "SUMMARIZE evals",
        "EXPLAIN SELECT * FROM evals JOIN trials USING (trial_id)",
        "PRAGMA table_info('trials')",
        "SELECT count(*) AS n FROM evals e JOIN epochs p USING (trial_id)",
    ],
)
def test_read_statements_still_run(study_dir: Path, sql: str):
    before = _tree(study_dir)
    res = runner.invoke(app, ["query", str(study_dir), sql, "--json"])
    assert res.exit_code == 0, res.output
    assert _tree(study_dir) == before


def test_values_that_look_like_markup_are_printed_as_they_are(study_dir: Path):
    res = runner.invoke(app, ["query", str(study_dir), "select '[/x] [bold]b[/bold] :smile:' as \"[/c]\""])
    assert res.exit_code == 0, res.output
    assert "[/x] [bold]b[/bold] :smile:" in res.stdout and "[/c]" in res.stdout
