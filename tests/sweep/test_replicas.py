"""Search replicas and the study seed in a real study (Ray Tune + Optuna + Parquet): every cell searched
R times independently, each replica with its own Optuna study, noise draw and split (shared by the
regularizers of a setting), its own best configuration and final seeds; comparisons paired by replica."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage

from reports.compare import compare, per_seed
from study.sweep.runner import run_study

pytestmark = pytest.mark.slow

SPEC = """\
name: replicas
seed: {seed}
dataset: {{name: mnist1d, options: {{max_train: 800, max_test: 300}}}}
models: [mlp]
regularizers:
  ce: {{}}
  label_smoothing: {{alpha: 0.1}}
noise: [{{kind: symmetric, rate: [0.3]}}]
train: {{epochs: 2, batch_size: 64, lr: {{low: 1.0e-3, high: 3.0e-2, log: true}}}}
search: {{trials_per_cell: 2, sampler: random, pruner: {{kind: none}}, replicas: 2}}
final: {{seeds: 2}}
evaluate: {{attacks: [], corruptions: [], max_samples: 200}}
resources: {{cpus_per_trial: 1, trials_per_process: auto}}
"""


@pytest.fixture(scope="module")
def studies(tmp_path_factory, env_cache):
    root = tmp_path_factory.mktemp("replicas")
    outs = {}
    for seed in (0, 5):
        spec = root / f"s{seed}.yaml"
        spec.write_text(SPEC.format(seed=seed))
        outs[seed] = run_study(spec, out=root / f"out{seed}", quiet=True)
    return outs


def test_each_replica_searches_and_retrains_on_its_own(studies):
    out = studies[0]
    trials = pd.read_parquet(out / "trials.parquet")
    assert sorted(trials["cell_id"].unique()) == [
        "mnist1d/mlp/ce/symmetric:0.3", "mnist1d/mlp/label_smoothing/symmetric:0.3",
    ]  # fmt: skip
    counts = trials.groupby(["cell_id", "replica", "phase"]).size()
    assert len(counts) == 2 * 2 * 2 and (counts == 2).all()
    assert (trials["status"] == "completed").all()
    # One Optuna study per cell and replica, each with its own trials.
    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == sorted(f"{c}/r{r}" for c in trials["cell_id"].unique() for r in (0, 1))
    # Each replica draws its own noise; the regularizers of a replica and seed share it exactly.
    final = trials[trials["phase"] == "final"]
    noise = final.groupby(["replica", "seed"])["realized_noise_rate"].agg(["min", "max", "count"])
    assert (noise["min"] == noise["max"]).all() and (noise["count"] == 2).all()
    search = trials[trials["phase"] == "search"]
    by_replica = search.groupby("replica")["realized_noise_rate"].first()
    assert by_replica[0] != by_replica[1]


def test_comparisons_pair_replicas_with_their_seeds_averaged(studies):
    out = studies[0]
    trials = pd.read_parquet(out / "trials.parquet")
    evals = pd.read_parquet(out / "evals.parquet")
    values = per_seed(trials, evals)
    acc = values[
        (values["metric"] == "accuracy") & (values["condition"] == "clean") & (values["split"] == "test")
    ]
    assert sorted(acc["seed"].unique()) == [0, 1]  # the unit: the replica
    final = trials[trials["phase"] == "final"].merge(
        evals[(evals["metric"] == "accuracy") & (evals["condition"] == "clean") & (evals["split"] == "test")],
        on="trial_id",
    )
    expected = final.groupby(["regularizer", "replica"])["value"].mean()
    got = acc.set_index(["regularizer", "seed"])["value"]
    assert got.sort_index().to_numpy() == pytest.approx(expected.sort_index().to_numpy())
    comp = compare(values, reference="ce")
    row = comp[(comp["metric"] == "accuracy") & (comp["condition"] == "clean") & (comp["split"] == "test")]
    assert row["n_units"].tolist() == [2]
    d = expected["label_smoothing"] - expected["ce"]
    assert row["diff"].iloc[0] == pytest.approx(d.mean())


def test_another_study_seed_is_another_replication(studies):
    a, b = (pd.read_parquet(out / "trials.parquet") for out in studies.values())
    assert json.loads((studies[5] / "manifest.json").read_text())["seed"] == 5
    key = ["cell_id", "replica", "phase", "seed"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert a[key].equals(b[key])  # the same plan ...
    assert not a["param_lr"].equals(b["param_lr"])  # ... other sampler draws
    assert not a["realized_noise_rate"].equals(b["realized_noise_rate"])  # ... other noise
