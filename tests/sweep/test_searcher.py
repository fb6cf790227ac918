"""The Tune searcher's hand-over from search to final trials, on real Optuna studies (no Ray needed:
the searcher is driven the way Tune drives it, one suggest per free slot, results told back)."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from study.optuna_kinds import PRUNERS, SAMPLERS
from study.spec import parse_spec
from study.sweep.cells import expand_cells
from study.sweep.context import StudyContext
from study.sweep.optuna_cells import CellStudies
from study.sweep.records import Records
from study.sweep.source import FINISHED, TrialSource

# Grid sampler: ce has nothing to search (budget 1 trial), label smoothing a grid of 3 values.
SPEC = """\
name: handover
dataset: {name: mnist1d}
models: [cnn1d]
regularizers:
  ce: {}
  label_smoothing: {alpha: {grid: [0.0, 0.1, 0.2]}}
noise: [{kind: none}]
train: {epochs: 2, lr: 0.01}
search: {trials_per_cell: 3, sampler: grid, pruner: {kind: none}}
final: {seeds: 2}
"""


def _searcher(out: Path) -> tuple[TrialSource, StudyContext, list[str]]:
    spec = parse_spec(SPEC)
    cells = expand_cells(spec)
    studies = CellStudies(spec, cells, out / "optuna.journal")
    ctx = StudyContext(spec, out, studies, lambda: None)
    told: list[str] = []
    searcher = TrialSource(spec, cells, studies, ctx, on_search_done=lambda: told.append("search_done"))
    return searcher, ctx, told


def _complete(searcher: TrialSource, ctx: StudyContext, tune_id: str, value: float) -> None:
    """What Tune's TrialEnds hook does when a trial ends with its final result."""
    rec = ctx.by_tune_id[tune_id]
    rec.payload = {"status": "completed", "best_value": value, "epoch_rows": []}
    ctx.trial_ended(tune_id, {"objective": value})


def test_final_trials_of_a_cell_start_when_its_search_ends(tmp_path):
    searcher, ctx, told = _searcher(tmp_path)
    assert searcher.remaining() == 1 + 3 + 2 * 2  # search budget + 2 final seeds per cell

    def phase_cell(tid: str) -> tuple[str, str]:
        rec = ctx.by_tune_id[tid]
        return rec.phase, rec.cell_id.split("/")[2]

    # Two slots: the fewest-asked cell first.
    assert searcher.suggest("t1") and searcher.suggest("t2")
    assert {phase_cell("t1"), phase_cell("t2")} == {("search", "ce"), ("search", "label_smoothing")}
    ce_tid = "t1" if phase_cell("t1")[1] == "ce" else "t2"
    ls_first = "t2" if ce_tid == "t1" else "t1"
    _complete(searcher, ctx, ce_tid, 0.5)
    # ce's search has ended, but label smoothing still has trials to ask: those come first.
    assert searcher.suggest("t3") and phase_cell("t3") == ("search", "label_smoothing")
    _complete(searcher, ctx, ls_first, 0.6)
    assert searcher.suggest("t4") and phase_cell("t4") == ("search", "label_smoothing")
    _complete(searcher, ctx, "t3", 0.9)
    # Nothing left to ask: ce's final trials start while label smoothing's last search trial runs.
    cfg = searcher.suggest("t5")
    assert phase_cell("t5") == ("final", "ce") and ctx.by_tune_id["t4"].ended_at is None
    assert cfg["trial"]["evaluate"] is not None and cfg["trial"]["seed"] == 1
    assert searcher.suggest("t6") and phase_cell("t6") == ("final", "ce")
    assert ctx.by_tune_id["t6"].config["seed"] == 2
    # Label smoothing's finals wait for its search: no suggestion yet, but not finished either.
    assert searcher.suggest("t7") is None and told == []
    _complete(searcher, ctx, "t4", 0.7)
    cfg = searcher.suggest("t7")
    assert told == ["search_done"] and phase_cell("t7") == ("final", "label_smoothing")
    # The final trials retrain the cell's best search configuration (alpha 0.1 or 0.2 scored 0.9).
    best_alpha = ctx.by_tune_id["t3"].params["alpha"]
    assert cfg["trial"]["regularizer"]["params"] == {"alpha": best_alpha}
    assert searcher.suggest("t8") and searcher.suggest("t9") == FINISHED
    assert told == ["search_done"]
    # Optuna: every search trial COMPLETE, and no final trial ever entered the studies.
    counts = {c: [t.state for t in searcher.studies.trials(c)] for c in searcher.studies.studies}
    assert sorted(len(v) for v in counts.values()) == [1, 3]
    assert all(s == TrialState.COMPLETE for v in counts.values() for s in v)


def test_a_resumed_searcher_asks_only_what_is_missing(tmp_path):
    searcher, ctx, _ = _searcher(tmp_path)
    ids = [f"t{i}" for i in range(4)]
    for tid in ids:
        assert searcher.suggest(tid)
    for i, tid in enumerate(ids):
        _complete(searcher, ctx, tid, 0.5 + 0.1 * i)
    first_final = searcher.suggest("f1")
    _complete(searcher, ctx, "f1", 0.8)  # one final trial done, then the driver is "killed"
    assert ctx.by_tune_id["f1"].phase == "final"
    assert Records(tmp_path / "records").load_all("final")  # its record is on disk

    again, ctx2, told = _searcher(tmp_path)
    assert again.remaining() == 3  # 4 final trials planned, 1 done; the search is complete
    keys = []
    while again.suggest(f"r{len(keys)}") not in (None, FINISHED):
        keys.append(ctx2.by_tune_id[f"r{len(keys)}"].key)
    assert told == ["search_done"] and len(keys) == 3
    assert ctx.by_tune_id["f1"].key not in keys and len(set(keys)) == 3
    assert first_final["trial"]["seed"] == 1


SWEEP = """\
name: every-sampler
dataset: {{name: mnist1d}}
models: [cnn1d]
regularizers:
  label_smoothing: {{alpha: {alpha}}}
noise: [{{kind: none}}, {{kind: symmetric, rate: [0.2]}}]
train: {{epochs: 6, lr: 0.01}}
search:
  trials_per_cell: 6
  sampler: {sampler}
  n_startup_trials: 2
  pruner: {{kind: {pruner}, n_startup_trials: 1, n_warmup_steps: 1, min_resource: 1, lower: 0.12}}
final: {{seeds: 1}}
"""


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # wilcoxon, patient
@pytest.mark.parametrize("sampler", SAMPLERS.names())
@pytest.mark.parametrize("pruner", PRUNERS.names())
def test_every_sampler_and_pruner_runs_a_search_to_its_final_trials(trial_source, sampler, pruner):
    # The driver's whole Optuna conversation for two cells (ask, one report per epoch, prune or tell),
    # with learning curves that rise with alpha: no sampler/pruner combination may raise, every search
    # trial ends in a finished Optuna state, and each cell then yields its final trial.
    alpha = "{grid: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]}" if sampler == "grid" else "{low: 0.0, high: 0.5}"
    spec = parse_spec(SWEEP.format(alpha=alpha, sampler=sampler, pruner=pruner))
    searcher, ctx = trial_source(spec)
    cells, studies = searcher.cells, searcher.studies
    finals, n = [], 0
    while (cfg := searcher.suggest(f"t{n}")) not in (None, FINISHED):
        rec = ctx.by_tune_id[f"t{n}"]
        if rec.phase == "final":
            finals.append(rec.cell_id)
        else:
            alpha_value = rec.params["alpha"]
            for epoch in range(1, 7):
                value = 0.1 + alpha_value * epoch / 6
                rec.epoch_rows.append({"epoch": epoch, "val_accuracy": value})
                if ctx.epoch_result(f"t{n}", {"epoch": epoch, "objective": value, "val_accuracy": value}):
                    ctx.trial_ended(f"t{n}")  # Tune stops the pruned trial
                    break
            else:
                best = max(r["val_accuracy"] for r in rec.epoch_rows)
                _complete(searcher, ctx, f"t{n}", best)
        assert cfg
        n += 1
    retrained = []
    for cell in cells:
        states = [t.state for t in studies.trials(cell.cell_id)]
        assert len(states) == 6 and all(s.is_finished() for s in states)
        complete = [t for t in studies.trials(cell.cell_id) if t.state == TrialState.COMPLETE]
        if complete:  # a cell whose every trial was pruned has nothing to retrain
            retrained.append(cell.cell_id)
            params, best = studies.best_params(cell)
            assert best == max(t.value for t in complete)
            assert params == studies.studies[cell.cell_id].best_params
    assert retrained and sorted(finals) == sorted(retrained)


def test_a_cell_whose_every_trial_is_pruned_gets_a_note_and_no_finals(trial_source):
    spec = parse_spec(
        SWEEP.format(alpha="{low: 0.0, high: 0.5}", sampler="random", pruner="threshold").replace(
            "lower: 0.12", "lower: 0.99"
        )
    )
    searcher, ctx = trial_source(spec)
    cells = searcher.cells
    n = 0
    while searcher.suggest(f"t{n}") not in (None, FINISHED):
        # Below the 0.99 floor from the first step past the warm-up: pruned there.
        row = {"epoch": 1, "objective": 0.5, "val_accuracy": 0.5}
        assert ctx.epoch_result(f"t{n}", row) and ctx.by_tune_id[f"t{n}"].status == "pruned"
        ctx.trial_ended(f"t{n}")  # Tune stops the pruned trial
        n += 1
    assert n == 12 and not any(r.phase == "final" for r in ctx.by_tune_id.values())
    assert sorted(ctx.notes) == sorted(
        f"{c.cell_id}: no search trial completed (6 pruned, 0 failed or diverged), so it has no final trials"
        for c in cells
    )


def test_a_diverged_search_trial_is_failed_in_optuna_not_complete(tmp_path):
    searcher, ctx, _ = _searcher(tmp_path)
    assert searcher.suggest("t1") and searcher.suggest("t2")
    rec = ctx.by_tune_id["t1"]
    # A NaN loss ends the trial as "diverged" with a best value from its finite epochs: that value
    # must not reach the sampler as a COMPLETE result.
    rec.payload = {"status": "diverged", "best_value": 0.42, "epoch_rows": []}
    ctx.trial_ended("t1", {"objective": 0.42})
    (frozen,) = [t for t in searcher.studies.trials(rec.cell_id) if t.number == rec.optuna_number]
    assert frozen.state == TrialState.FAIL and frozen.value is None
    assert frozen.user_attrs["status"] == "diverged" and rec.status == "diverged"


def test_live_view_counts_per_cell_best_and_eta(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from study.sweep import runner

    searcher, ctx, _ = _searcher(tmp_path)
    for tid in ("t1", "t2", "t3", "t4"):
        assert searcher.suggest(tid)
    ls = [t for t in ("t1", "t2", "t3", "t4") if "label_smoothing" in ctx.by_tune_id[t].cell_id]
    _complete(searcher, ctx, ls[0], 0.75)
    _complete(searcher, ctx, ls[1], 0.8125)
    ctx.by_tune_id[ls[2]].status = "pruned"  # as the scheduler leaves a pruned trial
    ctx.trial_ended(ls[2])
    view = runner.LiveView(ctx.spec, lambda: ctx, Console(), quiet=False)
    monkeypatch.setattr(view, "t0", view.t0 - 30.0)  # 30 s into the study
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(view.table())
    text = console.export_text()
    rows = {
        cells[0]: cells[1:]
        for line in text.splitlines()
        if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 6
    }
    # run, done, pruned, fail, best: two completed (best 0.8125) and one pruned; ce's one trial runs.
    # Short cell names: one dataset and one model, so neither is repeated; label_smoothing -> ls.
    assert rows["s ls none"] == ["0", "2", "1", "0", "0.8125"]
    assert rows["s ce none"] == ["1", "0", "0", "0", "-"]
    # 3 of the 8 planned trials (4 search + 4 final) ended; no epoch measured yet: no ETA (never a
    # guess from elapsed time).
    assert "3/8 trials ended, 0 epochs" in text and "ETA -" in text


def _fixed_params_source(tmp_path: Path, seeds: str, **kw) -> tuple[TrialSource, StudyContext]:
    """A TrialSource over ce and label smoothing at fixed hyperparameters (nothing to search)."""
    spec = parse_spec(
        "name: fixed\nmodels: [mlp]\nregularizers: {ce: {}, label_smoothing: {alpha: 0.1}}\n"
        f"train: {{epochs: 2, lr: 0.01}}\nfinal: {{seeds: {seeds}}}\n"
    )
    cells = expand_cells(spec)
    studies = CellStudies(spec, cells, tmp_path / "optuna.journal")
    ctx = StudyContext(spec, tmp_path, studies, lambda: None)
    return TrialSource(spec, cells, studies, ctx, **kw), ctx


def test_a_spec_with_nothing_to_search_skips_the_search_phase(tmp_path):
    told: list[str] = []
    source, ctx = _fixed_params_source(tmp_path, "2", on_search_done=lambda: told.append("search_done"))
    studies, cells = source.studies, source.cells
    assert source.remaining() == 4  # final trials only
    configs = [source.suggest(f"t{i}") for i in range(4)]
    assert told == ["search_done"] and all(ctx.by_tune_id[f"t{i}"].phase == "final" for i in range(4))
    assert {(c["trial"]["regularizer"]["name"], c["trial"]["seed"]) for c in configs} == {
        ("ce", 1),
        ("ce", 2),
        ("label_smoothing", 1),
        ("label_smoothing", 2),
    }
    assert all(not studies.trials(c.cell_id) for c in cells)  # nothing asked of Optuna


@pytest.mark.parametrize(
    ("effect", "spread", "expected", "stopped"),
    [(0.10, 0.005, 3, "decided"), (0.0, 0.05, 6, "max seeds"), (0.0, 0.0005, 3, "equivalent")],
)
def test_adaptive_seeds_stop_when_decided_or_equivalent(tmp_path, effect, spread, expected, stopped):
    """Large planted effect: decided after the first round (min seeds). Null with a spread of 5 points
    (much more than the 1-point accuracy margin): seeds until max. Null with a tiny spread: the 90% CI
    lies inside +-1 point after the first round: equivalent, which decides it too."""
    import numpy as np

    source, ctx = _fixed_params_source(tmp_path, "{min: 3, max: 6, until: decided}")
    rng = np.random.default_rng(0)
    seed_effect = {s: 0.8 + rng.normal(0, 0.05) for s in range(1, 7)}  # shared by both cells: paired
    n, running = 0, []
    while True:
        cfg = source.suggest(f"t{n}")
        if cfg == FINISHED:
            break
        if cfg is None:  # finals of the round still running: finish them, as Tune would
            assert running, "suggest waits with nothing running"
            for tid in running:
                rec = ctx.by_tune_id[tid]
                seed = rec.index
                acc = seed_effect[seed] + (effect if "label_smoothing" in rec.cell_id else 0.0)
                acc += rng.normal(0, spread)
                rec.payload = {"status": "completed", "best_value": acc, "epoch_rows": [],
                               "eval_rows": [{"split": "test", "condition": "clean", "severity": None,
                                              "metric": "accuracy", "value": acc}]}  # fmt: skip
                ctx.trial_ended(tid)
            running = []
            continue
        running.append(f"t{n}")
        n += 1
        assert n < 50
    seeds = {c: sorted(r.index for r in ctx.by_tune_id.values() if r.cell_id == c) for c in ctx.cells}
    assert all(s == list(range(1, expected + 1)) for s in seeds.values()), seeds
    record = source.seeds.record()
    ls = next(c for c in record if "label_smoothing" in c)
    assert record[ls]["stopped"].startswith(stopped), record[ls]
    assert record[ls]["seeds"] == expected


def test_run_trials_with_nothing_left_still_tells_search_done(tmp_path):
    """A resumed study whose trials all ended (killed in the post phase): no Tuner, search_done told."""
    from study.sweep import tune

    source, ctx = _fixed_params_source(tmp_path, "2")
    for i in range(4):
        assert source.suggest(f"t{i}")
        ctx.by_tune_id[f"t{i}"].payload = {"status": "completed", "best_value": 0.5, "epoch_rows": []}
        ctx.trial_ended(f"t{i}")
    resumed = StudyContext(ctx.spec, tmp_path, ctx.studies, lambda: None)
    told: list[str] = []
    cells = list(resumed.cells.values())
    again = TrialSource(ctx.spec, cells, ctx.studies, resumed, lambda: told.append("search_done"))
    tune.run_trials(ctx.spec, tmp_path, resumed, again, 1)
    assert told == ["search_done"] and not (tmp_path / "ray").exists()
