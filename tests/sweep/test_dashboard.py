"""Optuna dashboard: the journal's studies carry the objective's metric name and each Optuna trial the
trials.parquet trial_id (read back with Optuna's own JournalStorage API), and `study dashboard` serves
optuna-dashboard on 127.0.0.1 over that journal."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from typer.testing import CliRunner

from study.cli import app
from study.spec import parse_spec
from study.sweep.cells import expand_cells
from study.sweep.context import StudyContext
from study.sweep.optuna_cells import CellStudies
from study.sweep.records import trial_id_for, trial_key
from study.sweep.source import FINISHED, TrialSource

SPEC = """\
name: dash
dataset: {name: mnist1d}
models: [cnn1d]
regularizers:
  ce: {}
  label_smoothing: {alpha: {low: 0.0, high: 0.3}}
train: {epochs: 2, lr: 0.01}
search: {trials_per_cell: 2, metric: val_nll, pruner: {kind: none}}
final: {seeds: 1}
"""


def _run_search(out: Path) -> None:
    """The driver's Optuna conversation for a whole study (as in test_searcher), no Ray needed; each
    final trial completes with a clean test accuracy of 0.5 + its seed / 10."""
    spec = parse_spec(SPEC)
    (out / "spec.yaml").write_text(SPEC)
    cells = expand_cells(spec)
    studies = CellStudies(spec, cells, out / "optuna.journal")
    ctx = StudyContext(spec, out, studies, lambda: None)
    source = TrialSource(spec, cells, studies, ctx)
    n = 0
    while source.suggest(f"t{n}") not in (None, FINISHED):
        rec = ctx.by_tune_id[f"t{n}"]
        if rec.phase == "search":
            value = 1.0 - 0.1 * n
            ctx.epoch_result(f"t{n}", {"epoch": 1, "objective": value, "val_nll": value})
            rec.payload = {"status": "completed", "best_value": value, "epoch_rows": []}
        else:
            test = {"split": "test", "condition": "clean", "severity": None, "metric": "accuracy"}
            rec.payload = {"status": "completed", "best_value": 0.25, "epoch_rows": [],
                           "eval_rows": [{**test, "value": 0.5 + rec.index / 10}]}  # fmt: skip
        ctx.trial_ended(f"t{n}")
        n += 1


def test_journal_studies_carry_metric_names_and_trial_ids(tmp_path):
    _run_search(tmp_path)
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    summaries = optuna.get_all_study_summaries(storage)
    assert sorted(s.study_name for s in summaries) == [
        "mnist1d/cnn1d/ce/none",
        "mnist1d/cnn1d/label_smoothing/none",
    ]
    for s in summaries:
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        assert study.metric_names == ["val_nll"]
        trials = study.get_trials()
        assert len(trials) == 2
        for t in trials:
            # The same id as trials.parquet's row of this trial.
            expected = trial_id_for("dash", trial_key("search", s.study_name, t.number))
            assert t.user_attrs["trial_id"] == expected


def test_final_trials_become_cell_final_studies_in_a_copy_of_the_journal(tmp_path):
    from study.sweep.optuna_cells import add_final_studies

    _run_search(tmp_path)
    copy = tmp_path / "copy.journal"
    shutil.copy2(tmp_path / "optuna.journal", copy)
    storage = JournalStorage(JournalFileBackend(str(copy)))
    assert add_final_studies(storage, parse_spec(SPEC), tmp_path) == 2
    cells = ["mnist1d/cnn1d/ce/none", "mnist1d/cnn1d/label_smoothing/none"]
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == sorted(cells + [f"{c}/final" for c in cells])
    original = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    assert len(optuna.get_all_study_summaries(original)) == 2  # the run's own journal is untouched
    for cell in cells:
        search = optuna.load_study(study_name=cell, storage=storage)
        final = optuna.load_study(study_name=f"{cell}/final", storage=storage)
        assert final.metric_names == ["val_nll"] and final.direction == search.direction
        (trial,) = final.get_trials()
        seed = trial.user_attrs["seed"]
        assert trial.user_attrs["trial_id"] == trial_id_for("dash", trial_key("final", cell, seed))
        assert trial.value == 0.25 and trial.user_attrs["test_accuracy"] == pytest.approx(0.5 + seed / 10)
        assert trial.params == search.best_trial.params  # the configuration the search chose


def test_dashboard_help_and_bad_inputs(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["dashboard", "--help"])
    assert res.exit_code == 0 and "--port" in res.output and "127.0.0.1" in res.output
    res = runner.invoke(app, ["dashboard", str(tmp_path)])
    assert res.exit_code == 2 and "no optuna.journal" in res.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_journal_on_loopback(tmp_path):
    pytest.importorskip("optuna_dashboard")
    _run_search(tmp_path)
    port = _free_port()
    temp = tmp_path / "temp"  # where the dashboard puts its copy of the journal
    temp.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from study.cli import app; app()",
            "dashboard",
            str(tmp_path),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    try:
        body = None
        for _ in range(300):  # up to ~30 s for the server to come up
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as resp:
                    body = json.loads(resp.read())
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"dashboard exited: {proc.stderr.read().decode()[-500:]}")
                time.sleep(0.1)
        assert body is not None, "dashboard did not answer"
        names = sorted(s["study_name"] for s in body["study_summaries"])
        cells = ["mnist1d/cnn1d/ce/none", "mnist1d/cnn1d/label_smoothing/none"]
        assert names == sorted(cells + [f"{c}/final" for c in cells])  # the run has ended: finals too
        assert len(list(temp.iterdir())) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert not list(temp.iterdir())  # SIGTERM removed the copy
