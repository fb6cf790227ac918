"""One Optuna study per cell, all in one journal file; samplers, pruners and distributions from the spec.

Only the driver touches this (a multi-node cluster must not have workers write the journal).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from study.optuna_kinds import PRUNERS, SAMPLERS
from study.spec import Choices, Grid, Range, StudySpec
from study.sweep.cells import Cell, expand_cells, search_budget
from study.trial.config import SAMPLER_STREAM, derive_seed

optuna.logging.set_verbosity(optuna.logging.WARNING)


def distributions(cell: Cell) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for name, value in cell.searched.items():
        if isinstance(value, Range):
            if value.int:
                out[name] = IntDistribution(
                    int(value.low), int(value.high), log=value.log, step=int(value.step or 1)
                )
            else:
                out[name] = FloatDistribution(value.low, value.high, log=value.log, step=value.step)
        elif isinstance(value, (Choices, Grid)):
            out[name] = CategoricalDistribution(value.choices if isinstance(value, Choices) else value.grid)
    return out


def repair_journal(path: Path) -> str | None:
    """Cut a journal at its first line that is not a complete JSON record; a note saying so, or None.

    A torn tail (a driver killed while appending): Optuna's JournalFileBackend skips a last line without
    a newline when reading, but the next append glues its record onto that fragment, and from then on
    every read raises (JSONDecodeError). Bytes garbled mid-journal (a disk or a copy gone wrong) make
    every read raise too. Either way the journal is cut before the first unreadable line (a copy of the
    file is kept beside it, `.damaged-<time>`): records after it are dropped, not skipped, because
    Optuna numbers trials by their order in the journal. Trials whose start was dropped are asked and
    run again; trials whose end was dropped are told from their records (study/sweep/source.py).
    """
    if not path.exists():
        return None
    with path.open("rb") as f:
        data = f.read()
    keep, lineno = 0, 0
    while keep < len(data):
        end = data.find(b"\n", keep)
        if end < 0:
            break  # no newline: a torn last line
        try:
            json.loads(data[keep : end + 1])
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            break
        keep, lineno = end + 1, lineno + 1
    if keep == len(data):
        return None
    backup = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    shutil.copy2(path, backup)
    with path.open("r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    dropped = len(data) - keep
    later = data[keep:].count(b"\n")
    if later <= 1:
        what = "of an incomplete last record (a crash while writing)"
    else:
        what = (
            f"from line {lineno + 1} on: unreadable bytes mid-journal; the {later} records from there "
            "are dropped and the trials they described run again"
        )
    return f"{path.name}: dropped {dropped} bytes {what}; the damaged file is kept as {backup.name}"


def make_sampler(spec: StudySpec, cell: Cell) -> optuna.samplers.BaseSampler:
    # A per-cell seed derived from the cell id: reproducible, and cells do not sample in lockstep.
    seed = derive_seed(
        spec.seed, SAMPLER_STREAM, spec.search.seed + zlib.crc32(cell.cell_id.encode()) % 100_000
    )
    grid = None
    if spec.search.sampler == "grid":
        grid = {k: (v.grid if isinstance(v, Grid) else v.choices) for k, v in cell.searched.items()}
    return SAMPLERS[spec.search.sampler].build(spec.search, seed, grid)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    return PRUNERS[spec.search.pruner.kind].build(spec.search.pruner, spec.train.epochs)


def _tell(trial: optuna.Trial, value: float | None, state: TrialState) -> None:
    """study.tell, tolerating the grid sampler's end-of-grid stop.

    GridSampler.after_trial calls study.stop() once its grid is exhausted, and stop() raises
    RuntimeError outside study.optimize (ask-and-tell; optuna issues #4121, #5141). tell stores the
    trial's state before that (in a finally), and our own budget (trials_per_cell <= grid size) already
    ends the cell's search, so the error carries no information here.
    """
    try:
        if state == TrialState.COMPLETE:
            trial.study.tell(trial, value)
        else:
            trial.study.tell(trial, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


@dataclass
class CellStudies:
    """The journal, one study per cell, and the live Optuna trial objects of running Tune trials."""

    spec: StudySpec
    cells: list[Cell]
    journal: Path
    studies: dict[str, optuna.Study] = field(default_factory=dict)
    live: dict[int, optuna.Trial] = field(default_factory=dict)  # optuna internal trial id -> Trial

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its search algorithm with the Tuner; the journal is the state that matters.
        return {}

    def __post_init__(self) -> None:
        storage = JournalStorage(JournalFileBackend(str(self.journal)))
        for cell in self.cells:
            study = optuna.create_study(
                storage=storage,
                study_name=cell.cell_id,
                direction=self.spec.search.direction,
                sampler=make_sampler(self.spec, cell),
                pruner=make_pruner(self.spec),
                load_if_exists=True,
            )
            # optuna-dashboard labels the objective with these names (set again on resume: a no-op).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([self.spec.search.metric])
            self.studies[cell.cell_id] = study

    def budget(self, cell: Cell) -> int:
        return search_budget(self.spec, cell)

    def trials(
        self, cell_id: str, states: tuple[TrialState, ...] | None = None
    ) -> list[optuna.trial.FrozenTrial]:
        return self.studies[cell_id].get_trials(deepcopy=False, states=states)

    def ask(self, cell: Cell) -> optuna.Trial:
        trial = self.studies[cell.cell_id].ask(distributions(cell))
        self.live[trial._trial_id] = trial
        return trial

    def reattach(self, cell_id: str, frozen: optuna.trial.FrozenTrial) -> optuna.Trial:
        """A Trial object for a RUNNING trial left by an interrupted driver (resume re-runs it)."""
        trial = optuna.Trial(self.studies[cell_id], frozen._trial_id)
        self.live[frozen._trial_id] = trial
        return trial

    def report_and_should_prune(self, optuna_id: int, value: float, step: int) -> bool:
        trial = self.live.get(optuna_id)
        if trial is None:
            return False
        if step not in self._reported_steps(trial):
            trial.report(value, step)
        return trial.should_prune()

    @staticmethod
    def _reported_steps(trial: optuna.Trial) -> set[int]:
        return set(trial.study._storage.get_trial(trial._trial_id).intermediate_values)

    def tell(self, optuna_id: int, state: TrialState, value: float | None = None, status: str = "") -> None:
        trial = self.live.pop(optuna_id, None)
        if trial is None:
            return
        if status:
            trial.set_user_attr("status", status)
        _tell(trial, value if state == TrialState.COMPLETE else None, state)

    def tell_recorded(self, cell_id: str, frozen: optuna.trial.FrozenTrial, rec: dict[str, Any]) -> None:
        """Tell Optuna the outcome of a trial from its record (resume after a badly timed kill)."""
        study = self.studies[cell_id]
        trial = optuna.Trial(study, frozen._trial_id)
        # A journal cut after a damaged line may have lost the trial's params: the record has them.
        cell = next((c for c in self.cells if c.cell_id == cell_id), None)
        for name, dist in (distributions(cell) if cell is not None else {}).items():
            if name not in frozen.params and name in (rec.get("params") or {}):
                value = dist.to_internal_repr(rec["params"][name])
                study._storage.set_trial_param(frozen._trial_id, name, value, dist)
        if "trial_id" not in frozen.user_attrs and rec.get("trial_id"):
            trial.set_user_attr("trial_id", rec["trial_id"])
        payload = rec.get("payload") or {}
        status = rec["status"]
        trial.set_user_attr("status", status)
        if status == "completed" and payload.get("best_value") is not None:
            _tell(trial, payload["best_value"], TrialState.COMPLETE)
        else:
            _tell(trial, None, TrialState.PRUNED if status == "pruned" else TrialState.FAIL)

    def best_params(self, cell: Cell) -> tuple[dict[str, Any], float | None]:
        done = self.trials(cell.cell_id, (TrialState.COMPLETE,))
        if not done:
            return {}, None
        best = self.studies[cell.cell_id].best_trial
        return dict(best.params), best.value


def add_final_studies(storage: optuna.storages.BaseStorage, spec: StudySpec, out: Path) -> int:
    """Each cell's final trials as one more Optuna study, ``<cell>/final``, in `storage`, for
    optuna-dashboard: value the trial's objective, params its configuration (the cell's searched
    values), user attributes its trial_id, seed, status and clean test metrics (``test_accuracy``, ...).
    Meant for a copy of the journal (the run's own stays the search's). Returns the trials added."""
    from study.sweep.records import Records, clean_test_metrics

    cells = {c.cell_id: c for c in expand_cells(spec)}
    studies: dict[str, optuna.Study] = {}
    added = 0
    for rec in sorted(Records(out / "records").load_all("final").values(), key=lambda r: r["index"]):
        cell = cells.get(rec["cell_id"])
        if cell is None or rec["status"] == "running":
            continue
        if (study := studies.get(cell.cell_id)) is None:
            study = studies[cell.cell_id] = optuna.create_study(
                storage=storage, study_name=f"{cell.cell_id}/final", direction=spec.search.direction,
                load_if_exists=True,
            )  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([spec.search.metric])
        payload = rec.get("payload") or {}
        value = payload.get("best_value")
        done = rec["status"] == "completed" and value is not None
        attrs = {"trial_id": rec["trial_id"], "seed": rec["index"], "status": rec["status"]}
        attrs.update(clean_test_metrics(payload.get("eval_rows") or []))
        dists = {k: d for k, d in distributions(cell).items() if k in (rec.get("params") or {})}
        state, value = (TrialState.COMPLETE, value) if done else (TrialState.FAIL, None)
        try:
            trial = optuna.trial.create_trial(
                state=state, value=value, params={k: rec["params"][k] for k in dists}, distributions=dists,
                user_attrs=attrs,
            )  # fmt: skip
        except ValueError:  # a value outside its distribution (e.g. a median off the grid): as attributes
            attrs.update({f"param_{k}": rec["params"][k] for k in dists})
            trial = optuna.trial.create_trial(state=state, value=value, user_attrs=attrs)
        study.add_trial(trial)
        added += 1
    return added
