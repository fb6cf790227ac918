"""Post phase on real Ray: transfer attacks from the ce model of the same cell, and distillation."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from study.cli import app
from study.sweep.runner import run_study

pytestmark = pytest.mark.slow

SPEC = """\
name: distill
dataset: {name: mnist1d, options: {max_train: 1200, max_test: 300}}
models: [cnn1d]
regularizers:
  ce: {}
  label_smoothing: {alpha: 0.2}
  maxsup: {alpha: 0.2}
train: {epochs: 4, lr: 0.01}
search: {trials_per_cell: 1, pruner: {kind: none}}
final: {seeds: 1}
evaluate: {attacks: [pgd_ce, transfer], eps: [0.1], max_samples: 200}
distill: {student: mlp, temperature: 4.0, epochs: 3}
"""


def test_distillation_and_transfer_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("REGSTUDY_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "distill.yaml"
    spec.write_text(SPEC)
    console = Console(record=True, width=200, color_system=None)
    out = run_study(spec, out=tmp_path / "out", quiet=True, console=console)
    # The manifest followed the phases; the quiet log started at once and showed the post phase.
    phases = [s for s, _ in json.loads((out / "manifest.json").read_text())["phases"]]
    assert phases == ["running", "search_done", "post", "completed"]
    lines = console.export_text().splitlines()
    assert lines[0].startswith(
        # Nothing to search (fixed lr and strengths): the search phase is skipped.
        "study distill: 3 cells, 0 search + 3 final trials, max val_accuracy; starting Ray"
    )
    assert any(
        re.fullmatch(r"\S+ \+\S+ final ce none #1: completed val_accuracy=0\.\d{4} \(\d+s\)", ln)
        for ln in lines
    )
    # 2 transfer jobs (not for ce) and 3 distillations.
    assert sum(bool(re.search(r" post \d/5 (transfer|distill) \S+ none #1: done$", ln)) for ln in lines) == 5
    trials = pd.read_parquet(out / "trials.parquet")
    evals = pd.read_parquet(out / "evals.parquet").merge(trials[["trial_id", "regularizer", "phase"]])
    final = evals[evals.phase == "final"]
    distill = final[final.condition == "distill"].pivot_table(
        index="regularizer", columns="metric", values="value"
    )
    assert set(distill.index) == {"ce", "label_smoothing", "maxsup"}
    assert distill["student_accuracy"].between(0.1, 1.0).all()
    # The teacher accuracy of the distillation rows is the trial's own clean test accuracy.
    clean = final[(final.condition == "clean") & (final.metric == "accuracy")].set_index("regularizer")[
        "value"
    ]
    assert (distill["teacher_accuracy"] - clean).abs().max() < 1e-9
    # The baseline student (labels alone) is the same model for every teacher of a seed: same seed,
    # same noisy labels, same student recipe; the gain and the gap follow from the three accuracies.
    assert distill["baseline_student_accuracy"].nunique() == 1
    gain = distill["student_accuracy"] - distill["baseline_student_accuracy"]
    assert (distill["distill_gain"] - gain).abs().max() < 1e-12
    gap = distill["teacher_accuracy"] - distill["student_accuracy"]
    assert (distill["teacher_student_gap"] - gap).abs().max() < 1e-12
    transfer = final[final.condition == "transfer"]
    assert set(transfer.regularizer) == {"label_smoothing", "maxsup"}  # crafted on ce: not for ce itself
    assert set(transfer.severity) == {0.1}
    assert transfer["value"].between(0.0, 1.0).all()
    flags = final[final.metric == "gradient_masking"]
    assert len(flags) == 3 and set(flags["value"]) <= {0.0, 1.0}

    res = CliRunner().invoke(app, ["report", str(out), "--format", "markdown", "--no-plots", "--full"])
    assert res.exit_code == 0, res.output
    assert "student" in res.output.lower() and "teacher" in res.output.lower()
