"""Trial fusion in a real study (Ray Tune + Optuna): packs of trials per process, members pruned one by
one, per-member results exactly as one-trial-per-process, and resume after SIGKILL mid-pack."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from study.sweep.runner import run_study

pytestmark = pytest.mark.slow


# Two cells; the grid puts a learning rate that cannot learn (1e-6) and one that does (3e-2) into
# each cell's single search pack, so the threshold pruner stops exactly one member of each pack.
SPEC = """\
name: {name}
dataset: {{name: mnist1d, options: {{max_train: 1200, max_test: 400}}}}
models: [cnn1d]
regularizers:
  "{prefix}ce": {{}}
  "{prefix}label_smoothing": {{alpha: 0.1}}
noise:
  - {{kind: none}}
train: {{epochs: {epochs}, batch_size: 64, optimizer: adamw, lr: {{grid: [1.0e-6, 3.0e-2]}}}}
search:
  trials_per_cell: 2
  sampler: grid
  pruner: {{kind: threshold, lower: 0.2, n_warmup_steps: 2}}
final: {{seeds: 3}}
evaluate: {{attacks: [fgsm], eps: [0.05], corruptions: [], max_samples: 100}}
resources: {{cpus_per_trial: 1, trials_per_process: {k}}}
max_failures: 0
"""


def _write(path: Path, name: str, k: int | str, epochs: int = 4, prefix: str = "") -> Path:
    """`prefix="studygate:"` puts the losses behind the study gate (tests/studygate.py)."""
    path.write_text(SPEC.format(name=name, k=k, epochs=epochs, prefix=prefix))
    return path


@pytest.fixture(scope="module")
def studies(tmp_path_factory, env_cache):
    """The same study with one trial per process and with packs of 3 (max_concurrent 1: deterministic)."""
    root = tmp_path_factory.mktemp("packs")
    alone = run_study(_write(root / "a.yaml", "packs", 1), out=root / "alone", quiet=True, max_concurrent=1)
    packed = run_study(_write(root / "p.yaml", "packs", 3), out=root / "packed", quiet=True, max_concurrent=1)
    return alone, packed


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(out / f"{t}.parquet") for t in ("trials", "epochs", "evals", "params")}


def test_packed_tables_have_the_shape_and_values_of_one_trial_per_process(studies):
    alone, packed = (_tables(out) for out in studies)
    for name in ("trials", "epochs", "evals", "params"):
        assert list(packed[name].columns) == list(alone[name].columns), name
        assert dict(packed[name].dtypes) == dict(alone[name].dtypes), name
        assert len(packed[name]) == len(alone[name]), name
    key = ["cell_id", "phase", "seed", "param_lr"]
    a = alone["trials"].sort_values(key).reset_index(drop=True)
    p = packed["trials"].sort_values(key).reset_index(drop=True)
    assert list(p["trial_id"]) == list(a["trial_id"])  # same trials, same ids
    assert list(p["status"]) == list(a["status"]) and list(p["epochs"]) == list(a["epochs"])
    # Same seeds and hyperparameters, trained packed: equal up to float rounding over a few epochs.
    assert (p["best_value"] - a["best_value"]).abs().max() < 1e-3
    ev = ["trial_id", "condition", "severity", "metric"]
    ea = alone["evals"].set_index(ev)["value"].sort_index()
    ep = packed["evals"].set_index(ev)["value"].sort_index()
    assert (ep - ea).abs().max() < 2e-2  # test metrics of 400 samples: a flipped sample is 2.5e-3


def test_members_of_one_pack_are_pruned_one_by_one(studies):
    _, out = studies
    trials = pd.read_parquet(out / "trials.parquet")
    search = trials[trials["phase"] == "search"]
    for _, cell in search.groupby("cell_id"):
        by_lr = cell.set_index("param_lr")
        # The member that cannot learn is pruned at the first epoch the pruner looks at (epoch 2) ...
        assert by_lr.loc[1e-6, "status"] == "pruned" and by_lr.loc[1e-6, "epochs"] == 2
        # ... while its pack-mate trains on to the end and completes.
        assert by_lr.loc[3e-2, "status"] == "completed" and by_lr.loc[3e-2, "epochs"] == 4
    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    for summary in optuna.get_all_study_summaries(storage):
        frozen = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
        assert sorted(t.state.name for t in frozen) == ["COMPLETE", "PRUNED"]
    # They were packs: search [ce #0, ls #0, ce #1], refilled with ls #1 when the first member was
    # pruned; then each cell's 3 final seeds.
    tune_dirs = sorted(p.name.rsplit("_", 1)[0] for p in (out / "ray").glob("trials-*/*") if p.is_dir())
    assert tune_dirs == [
        "mnist1d_cnn1d_ce_none_final_1_2_3", "mnist1d_cnn1d_ce_none_search_0_2",
        "mnist1d_cnn1d_label_smoothing_none_final_1_2_3",
    ]  # fmt: skip


def test_sigkill_during_a_packed_epoch_then_resume_loses_duplicates_and_reruns_nothing(
    tmp_path, env_cache, run_and_sigkill
):
    spec_path = _write(tmp_path / "kill.yaml", "packs-kill", 3, epochs=8, prefix="studygate:")
    out = tmp_path / "out"
    # One pack at a time: every search member has ended (4 records) before a final pack starts; the
    # gate holds the first final pack at the start of its epoch 2, its epoch 1 checkpointed.
    cmd = run_and_sigkill(spec_path, out, "--max-concurrent", "1", records="records/search/*.json", after=4)
    records_before = {p.name: json.loads(p.read_text()) for p in (out / "records").glob("*/*.json")}
    rows_before = {
        p.parent.name: torch.load(p, weights_only=True)["epoch_rows"]
        for p in (out / "checkpoints").glob("final*/checkpoint.pt")
    }
    assert rows_before and all(0 < len(r) < 8 for r in rows_before.values()), "killed mid-pack"

    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    trials = pd.read_parquet(out / "trials.parquet")
    epochs = pd.read_parquet(out / "epochs.parquet")
    assert trials["trial_id"].is_unique  # nothing duplicated
    counts = trials.groupby(["cell_id", "phase"]).size().unstack()
    assert (counts["search"] == 2).all() and (counts["final"] == 3).all()  # nothing lost
    for name, rec in records_before.items():  # nothing that had ended ran again
        after = json.loads((out / "records" / rec["phase"] / name).read_text())
        assert after["ended_at"] == rec["ended_at"], f"{name} was re-run"
    finals = trials[trials["phase"] == "final"]
    assert (finals["status"] == "completed").all() and (finals["epochs"] == 8).all()
    for _, trial in finals.iterrows():
        rows = epochs[epochs["trial_id"] == trial["trial_id"]].sort_values("epoch")
        assert list(rows["epoch"]) == list(range(1, 9))  # every epoch once
    # The members killed mid-pack continued from their checkpoints: their first epochs are the rows
    # written before the kill (same losses and wall times, to the bit), not a new run.
    for rows in rows_before.values():
        first = rows[0]
        match = epochs[(epochs["wall_s"] == first["wall_s"]) & (epochs["train_loss"] == first["train_loss"])]
        assert len(match) == 1
        done = epochs[epochs["trial_id"] == match["trial_id"].iloc[0]].sort_values("epoch")
        assert list(done["wall_s"].iloc[: len(rows)]) == [r["wall_s"] for r in rows]
    # Optuna: every search trial told once, none left running.
    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    for summary in optuna.get_all_study_summaries(storage):
        frozen = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in frozen) and len(frozen) == 2


# Ray-free: how TrialSource composes packs (what Tune would be handed, one suggest per free slot).
PACK_SPEC = """\
name: composition
dataset: {name: mnist1d}
models: [mlp, cnn1d]
regularizers:
  ce: {}
  label_smoothing: {alpha: {low: 0.0, high: 0.3}}
noise: [{kind: none}, {kind: symmetric, rate: [0.4]}]
train: {epochs: 2, lr: 0.01}
search: {trials_per_cell: 3, sampler: random, pruner: {kind: none}}
final: {seeds: 2, epochs: 3}
resources: {trials_per_process: 4}
"""


def test_packs_share_a_model_and_a_phase_and_cover_every_trial_once(trial_source):
    from study.spec import parse_spec
    from study.sweep.source import FINISHED
    from study.trial.config import TrialConfig
    from study.trial.pack import pack_key

    spec = parse_spec(PACK_SPEC)
    source, ctx = trial_source(spec)
    packs, n = [], 0
    while (config := source.suggest(f"t{n}")) != FINISHED:
        n += 1
        assert config is not None, "with every trial ended at once, something is always ready"
        members = config["pack"]
        assert 1 <= len(members) <= 4
        cfgs = [TrialConfig.model_validate(m["trial"]) for m in members]
        assert len({pack_key(c) for c in cfgs}) == 1  # trainable together (final: 3 epochs, search: 2)
        recs = [ctx.by_tune_id[m["id"]] for m in members]
        assert len({r.phase for r in recs}) == 1
        packs.append(recs)
        for m in members:  # every member completes
            ctx.by_tune_id[m["id"]].payload = {"status": "completed", "best_value": 0.5, "epoch_rows": []}
        ctx.trial_ended(f"t{n - 1}")
    keys = [r.key for pack in packs for r in pack]
    assert len(keys) == len(set(keys)) == 8 * 3 + 8 * 2  # 8 cells: 3 search trials and 2 seeds each
    search = [pack for pack in packs if pack[0].phase == "search"]
    # A search pack spreads over its model's cells (each cell's sampler sees its earlier trials).
    assert len({r.cell_id for r in search[0]}) == 4


@pytest.mark.parametrize(
    ("model", "batch", "gpus", "size"),
    [("cnn1d", 32, 0, 16), ("mlp", 64, 0, 16), ("cnn1d", 128, 0, 8), ("mlp", 128, 0.5, 4)],
)
def test_auto_pack_size_follows_the_measured_table(trial_source, model, batch, gpus, size):
    from study.spec import parse_spec

    text = PACK_SPEC.replace("models: [mlp, cnn1d]", f"models: [{model}]")
    text = text.replace("lr: 0.01}", f"lr: 0.01, batch_size: {batch}}}")
    text = text.replace("trials_per_process: 4}", f"trials_per_process: auto, gpus_per_trial: {gpus}}}")
    spec = parse_spec(text)
    source, _ = trial_source(spec)
    assert {source.pack_size(c) for c in source.cells} == {size}
    # Models without the batched-matmul path train alone on a CPU (they gain nothing there).
    resources = spec.resources.model_copy(update={"gpus_per_trial": 0})
    assert resources.pack_size("resnet20", 32) == 1
    assert resources.model_copy(update={"gpus_per_trial": 1}).pack_size("resnet20", 128) == 4


def test_a_trial_is_never_pruned_after_its_last_epoch(trial_source):
    from study.spec import parse_spec

    # A threshold no trial reaches: every epoch is "prune" to the pruner.
    pruner = "pruner: {kind: threshold, lower: 2.0, n_warmup_steps: 1}"
    text = PACK_SPEC.replace("pruner: {kind: none}", pruner)
    text = text.replace("trials_per_process: 4", "trials_per_process: 1")
    spec = parse_spec(text)
    source, ctx = trial_source(spec)
    source.suggest("a")  # train.epochs is 2 for search trials
    assert ctx.epoch_result("a", {"epoch": 1, "objective": 0.5}) is True
    source.suggest("b")
    assert ctx.epoch_result("b", {"epoch": 2, "objective": 0.5}) is False
    assert ctx.by_tune_id["b"].status == "running" and ctx.by_tune_id["a"].status == "pruned"
