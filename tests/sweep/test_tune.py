"""The sweep on real Ray and real Optuna: planned rows, PRUNED trials in the journal, concurrency,
fault tolerance, and resume after the driver is killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from study.spec import load_spec
from study.sweep.cells import expand_cells
from study.sweep.runner import run_study

pytestmark = pytest.mark.slow

STUDY_BIN = str(Path(sys.executable).with_name("study"))
ROOT = Path(__file__).resolve().parents[2]

TINY = """\
name: {name}
dataset: {{name: mnist1d, options: {{max_train: 1200, max_test: 400}}}}
models: [cnn1d]
regularizers:
{regularizers}
noise:
  - {{kind: none}}
  - {{kind: symmetric, rate: [0.3]}}
train: {{epochs: {epochs}, batch_size: 128, lr: {{low: 1.0e-5, high: 3.0e-2, log: true}}}}
search:
  trials_per_cell: {trials}
  sampler: tpe
  n_startup_trials: 1
  pruner: {{kind: median, n_startup_trials: 1, n_warmup_steps: 1}}
final: {{seeds: 1}}
resources: {{cpus_per_trial: 1}}
max_failures: 1
"""

REGS = "  ce: {}\n  label_smoothing: {alpha: {low: 0.0, high: 0.3}}"
# The same losses behind the study gate (tests/studygate.py), for the tests that kill a running study.
GATED_REGS = '  "studygate:ce": {}\n  "studygate:label_smoothing": {alpha: {low: 0.0, high: 0.3}}'


def _write_spec(path: Path, name: str, *, regularizers: str = REGS, epochs: int = 4, trials: int = 4) -> Path:
    path.write_text(TINY.format(name=name, regularizers=regularizers, epochs=epochs, trials=trials))
    return path


def _journal_trials(out: Path) -> dict[str, list[optuna.trial.FrozenTrial]]:
    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    return {
        s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)
        for s in optuna.get_all_study_summaries(storage)
    }


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, env_cache):
    """The CI smoke study itself (search_spaces/smoke.yaml), run once for the checks below."""
    root = tmp_path_factory.mktemp("smoke")
    spec_path = ROOT / "search_spaces" / "smoke.yaml"
    out = run_study(spec_path, out=root / "out", quiet=True)
    return spec_path, out


def test_planned_rows_per_cell_and_phase(tiny_study):
    spec_path, out = tiny_study
    spec = load_spec(spec_path)
    trials = pd.read_parquet(out / "trials.parquet")
    assert trials["trial_id"].is_unique
    counts = trials.groupby(["cell_id", "phase"]).size().unstack()
    assert set(counts.index) == {c.cell_id for c in expand_cells(spec)}
    assert (counts["search"] == spec.search.trials_per_cell).all()
    assert (counts["final"] == spec.final.seeds).all()
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"
    assert set(trials["status"]) <= {"completed", "pruned"}
    assert (trials["node"].notna()).all() and (trials["device"] == "cpu").all()
    # Final trials are fully evaluated on the clean test set.
    evals = pd.read_parquet(out / "evals.parquet")
    final_ids = set(trials.loc[trials.phase == "final", "trial_id"])
    acc = evals[(evals.metric == "accuracy") & (evals.condition == "clean") & (evals.split == "test")]
    assert set(acc["trial_id"]) == final_ids
    assert acc["value"].between(0.0, 1.0).all()


def test_journal_holds_one_study_per_cell_with_pruned_trials(tiny_study):
    spec_path, out = tiny_study
    spec = load_spec(spec_path)
    journal = _journal_trials(out)
    assert set(journal) == {c.cell_id for c in expand_cells(spec)}
    trials = pd.read_parquet(out / "trials.parquet")
    search = trials[trials.phase == "search"].set_index(["cell_id", "optuna_number"])
    n_pruned = 0
    for cell_id, frozen in journal.items():
        assert len(frozen) == spec.search.trials_per_cell
        for t in frozen:
            row = search.loc[(cell_id, t.number)]
            if t.state == TrialState.PRUNED:
                n_pruned += 1
                # Stored as PRUNED (never COMPLETE); Optuna keeps the last intermediate value with it,
                # which its samplers treat as a pruned observation, not a finished one.
                assert t.value == t.intermediate_values[max(t.intermediate_values)]
                assert row["status"] == "pruned" and row["epochs"] < row["max_epochs"]
                assert max(t.intermediate_values) == row["epochs"]
            else:
                assert t.state == TrialState.COMPLETE
                assert row["status"] == "completed"
                assert t.value == pytest.approx(row["best_value"])
                assert len(t.intermediate_values) == spec.train.epochs
    assert n_pruned >= 1


def test_two_trials_run_at_the_same_time(tiny_study):
    _, out = tiny_study
    trials = pd.read_parquet(out / "trials.parquet")
    intervals = list(zip(trials["started_at"], trials["ended_at"], strict=True))
    overlaps = sum(1 for (a0, a1), (b0, b1) in combinations(intervals, 2) if a0 < b1 and b0 < a1)
    assert overlaps >= 1


def test_final_phase_uses_each_cells_best_search_params(tiny_study):
    _, out = tiny_study
    trials = pd.read_parquet(out / "trials.parquet")
    for _, group in trials.groupby("cell_id"):
        search = group[(group.phase == "search") & (group.status == "completed")]
        best_lrs = set(search.loc[search["best_value"] == search["best_value"].max(), "param_lr"])
        final = group[group.phase == "final"]
        assert set(final["param_lr"]) <= best_lrs and len(set(final["param_lr"])) == 1
        assert (final["seed"] >= 1).all()  # seed 0 trained the search trials


CRASH_MODULE = """
import os, pathlib, torch
import torch.nn.functional as F

class Crashing(torch.nn.Module):
    def forward(self, logits, targets):
        log = pathlib.Path(os.environ["CRASH_LOG"])
        with log.open("a") as f:
            f.write(f"{os.getpid()}\\n")
        raise RuntimeError("boom: injected failure")

def make():
    return Crashing()
"""


def test_crashing_trial_is_retried_then_recorded_failed(tmp_path, env_cache, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "crashmod.py").write_text(CRASH_MODULE)
    log = tmp_path / "crash.log"
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", str(pkg) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("CRASH_LOG", str(log))
    regs = '  ce: {}\n  "crashmod:make": {}'
    spec_path = _write_spec(tmp_path / "crash.yaml", "crash", regularizers=regs, epochs=2, trials=2)
    # The default results dir is relative (results/<name>): Tune needs it absolute, run_study resolves it.
    monkeypatch.chdir(tmp_path)
    out = run_study(spec_path, quiet=True)
    assert out == tmp_path / "results" / "crash"
    trials = pd.read_parquet(out / "trials.parquet")
    crashed = trials[trials.regularizer == "crashmod:make"]
    assert len(crashed) == 2 * 2  # 2 noise settings x 2 search trials, no final phase for them
    assert (crashed["status"] == "failed").all()
    assert crashed["error"].str.contains("boom: injected failure").all()
    # max_failures: 1 -> every failed trial ran twice.
    assert len(log.read_text().split()) == 2 * len(crashed)
    ok = trials[trials.regularizer == "ce"]
    assert ok.groupby("phase").size().to_dict() == {"search": 4, "final": 2}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    # The run says why those cells have no final trials (manifest, terminal, report header).
    assert sorted(manifest["notes"]) == sorted(
        f"{c}: no search trial completed (0 pruned, 2 failed or diverged), so it has no final trials"
        for c in set(crashed["cell_id"])
    )
    for cell_id, frozen in _journal_trials(out).items():
        if "crashmod" in cell_id:
            assert {t.state for t in frozen} == {TrialState.FAIL}


def _resume(cmd: list[str], out: Path) -> pd.DataFrame:
    """The same command with --resume, which must succeed; the trials table it leaves."""
    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return pd.read_parquet(out / "trials.parquet")


def test_resume_after_sigkill_has_no_missing_duplicate_or_rerun_trials(tmp_path, env_cache, run_and_sigkill):
    spec_path = _write_spec(tmp_path / "resume.yaml", "resume", regularizers=GATED_REGS, epochs=5, trials=5)
    out = tmp_path / "out"
    records = out / "records" / "search"
    cmd = run_and_sigkill(spec_path, out, records="records/search/*.json", after=4)
    before = {p.name: json.loads(p.read_text()) for p in records.glob("*.json")}
    assert 4 <= len(before) < 20, "the driver must be killed mid-search"

    trials = _resume(cmd, out)
    assert trials["trial_id"].is_unique
    counts = trials.groupby(["cell_id", "phase"]).size().unstack()
    assert len(counts) == 4 and (counts["search"] == 5).all() and (counts["final"] == 1).all()
    after = {p.name: json.loads(p.read_text()) for p in records.glob("*.json")}
    for name, rec in before.items():
        assert after[name]["ended_at"] == rec["ended_at"], f"{name} was re-run"
    for frozen in _journal_trials(out).values():
        assert len(frozen) == 5
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in frozen)


def test_resume_after_sigkill_in_the_final_phase_reruns_no_finished_trial(
    tmp_path, env_cache, run_and_sigkill
):
    # Final trials start while other cells still search (one Tuner for both phases): kill the driver
    # once the first final trial has ended, then resume.
    spec_path = _write_spec(
        tmp_path / "resume.yaml", "resume-final", regularizers=GATED_REGS, epochs=3, trials=3
    )
    out = tmp_path / "out"
    cmd = run_and_sigkill(spec_path, out, records="records/final/*.json", after=1)
    before = {p.name: json.loads(p.read_text()) for p in (out / "records").glob("*/*.json")}
    n_final = sum(rec["phase"] == "final" for rec in before.values())
    assert 1 <= n_final < 4, "the driver must be killed during the final phase"

    trials = _resume(cmd, out)
    assert trials["trial_id"].is_unique
    counts = trials.groupby(["cell_id", "phase"]).size().unstack()
    assert len(counts) == 4 and (counts["search"] == 3).all() and (counts["final"] == 1).all()
    after = {p.name: json.loads(p.read_text()) for p in (out / "records").glob("*/*.json")}
    for name, rec in before.items():
        assert after[name]["ended_at"] == rec["ended_at"], f"{name} was re-run"


def test_run_refuses_existing_or_foreign_results_dir(tiny_study, tmp_path):
    spec_path, out = tiny_study
    before = {p: p.read_bytes() for p in out.glob("*.parquet")}
    res = subprocess.run(
        [STUDY_BIN, "run", str(spec_path), "--out", str(out)], capture_output=True, text=True
    )
    assert res.returncode == 2 and "--resume" in res.stderr
    other = _write_spec(tmp_path / "other.yaml", "other", epochs=3)
    res = subprocess.run([STUDY_BIN, "run", str(other), "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 2 and "different study" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in out.glob("*.parquet")} == before
