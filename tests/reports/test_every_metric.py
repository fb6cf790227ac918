"""Every metric the vocabulary tables (one with a report question) gets its table in the report, read
from evals rows alone: a metric added to ``study.vocabulary.METRICS`` is tested here with no edit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from reports.build import load_study, write_table
from reports.render import build_tables
from reports.synthetic import make_synthetic_study
from study import vocabulary


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("metrics") / "s"
    make_synthetic_study(out, models=("mlp",), noise_settings=("none",), seeds=2, search_trials=2)
    return out


@pytest.mark.parametrize("metric", [m for m in vocabulary.METRICS if m.question], ids=lambda m: m.name)
def test_a_tabled_metric_gets_its_table(study_dir, tmp_path, metric):
    evals = pd.read_parquet(study_dir / "evals.parquet")
    clean = evals[(evals["metric"] == "accuracy") & (evals["condition"] == vocabulary.CLEAN)]
    clean = clean[clean["split"] == "test"]
    rng = np.random.default_rng(0)
    rows = clean.assign(
        metric=metric.name, split=metric.split, condition=metric.condition, severity=np.nan,
        value=rng.uniform(0.2, 0.8, len(clean)),
    )  # fmt: skip
    out = tmp_path / "s"
    out.mkdir()
    for name in ("trials", "epochs", "manifest", "spec"):
        for src in study_dir.glob(f"{name}.*"):
            (out / src.name).write_bytes(src.read_bytes())
    others = evals[evals["metric"] != metric.name]
    write_table(out, "evals", pd.concat([others, rows], ignore_index=True))
    titles = [t.title for t in build_tables(load_study(out))]
    assert any(t.endswith(f": {metric.label}") for t in titles), titles
