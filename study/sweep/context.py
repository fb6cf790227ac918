"""Driver-side state of a study run, without Ray: what happened to each trial.

``StudyContext`` keeps the records, talks to the cells' Optuna studies (report, prune, tell) and feeds
the live view; ``TrialSource`` (study/sweep/source.py) decides the next trial. The Ray adapter
(study/sweep/tune.py) calls into both from Tune's searcher, scheduler and callbacks.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from study.spec import StudySpec
from study.sweep.cells import Cell, expand_cells
from study.sweep.optuna_cells import CellStudies
from study.sweep.records import Records, TrialRecord, run_name, safe_name, trial_id_for, trial_key
from study.sweep.trackers import Trackers
from study.vocabulary import EPOCH_COLUMNS, TERM_PREFIX


class DriverOnly:
    """Driver-side state that Tune pickles with the Tuner (for Tuner.restore) but never needs back:
    it holds locks, open files and the live view, so it pickles as an empty shell."""

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class StudyContext(DriverOnly):
    """Driver-side state of a run: records, Optuna studies and the live view."""

    def __init__(
        self, spec: StudySpec, out: Path, studies: CellStudies | None, on_progress: Callable[[], None]
    ):
        self.spec, self.out, self.studies = spec, out, studies
        self.records = Records(out / "records")
        self.by_tune_id: dict[str, TrialRecord] = {}
        self.on_progress = on_progress
        self.cells = {c.cell_id: c for c in expand_cells(spec)}
        # (path, pyarrow filesystem) for Tune's own experiment state when --storage is given.
        self.tune_storage: tuple[str, Any] | None = None
        # Called after each trial has been recorded and told to Optuna (runner mirrors to --storage).
        self.after_trial: Callable[[], None] = lambda: None
        # One line per thing the user should know that is not an error (e.g. a cell with no finals).
        self.notes: list[str] = []
        # The spec's `tracking:` block: every ended trial is logged once, from its record (trackers.py).
        self.trackers = Trackers(spec, out, self.notes)
        # Tune trial id -> its members' ids (member_id) when trials are packed.
        self.packs: dict[str, list[str]] = {}
        self.pack_board: Any = None  # the Ray actor packs read pruned and new members from (sweep/tune.py)

    def progress(self) -> None:
        self.on_progress()

    def _checkpoint_dir(self, key: str) -> str:
        return str(self.out / "checkpoints" / safe_name(key))

    def new_search_trial(self, tune_id: str, cell: Cell, trial: Any) -> dict[str, Any]:
        key = trial_key("search", cell.cell_id, trial.number)
        params = dict(trial.params)
        config = cell.trial_config(
            self.spec,
            params,
            seed=self.spec.search.seed,
            phase="search",
            checkpoint_dir=self._checkpoint_dir(key),
        ).model_dump(mode="json")
        rec = TrialRecord(
            key=key,
            trial_id=trial_id_for(self.spec.name, key),
            phase="search",
            cell_id=cell.cell_id,
            index=trial.number,
            config=config,
            params=params,
            optuna_number=trial.number,
            optuna_id=trial._trial_id,
        )
        # The trials.parquet trial_id on the Optuna trial: the dashboard's trials join the tables.
        trial.set_user_attr("trial_id", rec.trial_id)
        self.by_tune_id[tune_id] = rec
        self.progress()
        return {"trial": config, "name": run_name(rec)}

    def epoch_result(self, tune_id: str, result: dict) -> bool:
        """One reported epoch of a trial (or pack member): its row (the one place epoch rows are added)
        and, for a search trial, the cell pruner's verdict. True when it prunes the trial: the trial is
        marked pruned and ends when Tune stops it or its pack reports its result (``trial_ended``)."""
        rec = self.by_tune_id.get(tune_id)
        if rec is None or rec.ended_at is not None:
            return False
        rec.node, rec.device = result.get("node", rec.node), result.get("device", rec.device)
        row = {k: result[k] for k in result if k in EPOCH_COLUMNS or k.startswith(TERM_PREFIX)}
        rec.epoch_rows = [r for r in rec.epoch_rows if r["epoch"] != row["epoch"]] + [row]
        self.progress()
        if self.studies is None or rec.phase != "search" or rec.status == "pruned":
            return False
        prune = self.studies.report_and_should_prune(
            rec.optuna_id, float(result["objective"]), int(result["epoch"])
        )
        # A trial that has trained its last epoch has nothing left to save: it completes (and its value
        # reaches the sampler) instead of being pruned at the end; its last value is reported all the same.
        prune = prune and int(result["epoch"]) < int(rec.config["train"]["epochs"])
        if prune:
            rec.status = "pruned"
        return prune

    def trial_ended(self, tune_id: str, result: dict | None = None, error: str | None = None) -> None:
        """A trial has ended, whatever ended it: its final `result` (its payload under ``"final"``), an
        `error`, or Tune stopping a trial the pruner marked. The one path to a trial's record and Optuna
        tell. `tune_id` may be a pack's: every member still running ends with it (a failed pack; a
        pack's members normally end one by one, each with its own result). A trial that has ended
        already is left as it is: its worker may report it again (a retried pack re-reports its
        ended members; a pruned member still reports its result)."""
        recs = (self.by_tune_id.get(i) for i in self.packs.get(tune_id, [tune_id]))
        ended = [r for r in recs if r is not None and r.ended_at is None]
        for rec in ended:
            # A pruned trial is recorded as the driver saw it when it pruned: Tune stops a trial alone
            # before it sends a result, and a pruned pack member's record must be the same.
            if result and "final" in result and rec.status != "pruned":
                rec.payload = json.loads(result["final"])
            self._record_end(rec, error)
            if rec.phase == "search" and self.studies is not None:
                self._tell(rec)
            self.trackers.trial_ended(rec.to_json())  # last: its record and Optuna come first
        if ended:
            self.after_trial()

    def _record_end(self, rec: TrialRecord, error: str | None) -> None:
        rec.ended_at = time.time()
        if rec.status == "pruned":
            pass  # the pruner's verdict stands, whatever the worker did after it
        elif error is not None:
            rec.status, rec.error = "failed", error
        else:
            rec.status = rec.payload["status"] if rec.payload else "failed"
            if rec.payload is None:
                rec.error = "trial ended without a final result"
        if rec.payload:
            # Epoch rows restored from a checkpoint on resume are in the payload, not in the live stream.
            rec.epoch_rows = rec.payload.get("epoch_rows") or rec.epoch_rows
            rec.started_at = rec.payload.get("started_at", rec.started_at)
        # Record first, then tell Optuna: a driver killed in between leaves a record whose trial Optuna
        # still shows RUNNING (TrialSource tells it on resume), never a finished trial without a row.
        self.records.save(rec)
        if rec.phase == "search" and not self.spec.search.keep_checkpoints:
            shutil.rmtree(self._checkpoint_dir(rec.key), ignore_errors=True)
        self.progress()

    def _tell(self, rec: TrialRecord) -> None:
        assert self.studies is not None
        payload = rec.payload
        if rec.status == "pruned":
            self.studies.tell(rec.optuna_id, TrialState.PRUNED, status="pruned")
        elif rec.status == "failed" or payload is None:
            self.studies.tell(rec.optuna_id, TrialState.FAIL, status="failed")
        elif payload["status"] == "completed" and payload["best_value"] is not None:
            self.studies.tell(rec.optuna_id, TrialState.COMPLETE, payload["best_value"], status="completed")
        else:
            # Diverged trials are not COMPLETE: their value would mislead the sampler.
            self.studies.tell(rec.optuna_id, TrialState.FAIL, status=payload["status"])

    def pack(self, tune_id: str, members: list[dict[str, Any]]) -> dict[str, Any]:
        """The Tune config of a pack: its members' configs (from new_*_trial with member_id ids)."""
        ids = [member_id(tune_id, j) for j in range(len(members))]
        self.packs[tune_id] = ids
        recs = [self.by_tune_id[i] for i in ids]
        if len({r.cell_id for r in recs}) == 1:
            name = f"{recs[0].cell_id}/{recs[0].phase}/#" + "+".join(str(r.index) for r in recs)
        else:  # a pack over cells: named after its first member
            name = f"{run_name(recs[0])}+{len(recs) - 1}"
        configs = [{"id": i, "trial": m["trial"]} for i, m in zip(ids, members, strict=True)]
        return {"pack": configs, "name": name}

    def remove_search_checkpoints(self) -> None:
        """Remove the checkpoints of every ended search trial (keep_checkpoints: false), also those a
        worker wrote again after its trial had ended (a pruned trial's last epoch), or an earlier run
        left. Final trials keep theirs: the post phase and `study report` users read model.pt."""
        if self.spec.search.keep_checkpoints:
            return
        for key, rec in self.records.load_all("search").items():
            if rec["status"] != "running":
                shutil.rmtree(self._checkpoint_dir(key), ignore_errors=True)

    def new_final_trial(self, tune_id: str, cell: Cell, params: dict[str, Any], seed: int) -> dict[str, Any]:
        key = trial_key("final", cell.cell_id, seed)
        config = cell.trial_config(
            self.spec, params, seed=seed, phase="final", checkpoint_dir=self._checkpoint_dir(key)
        ).model_dump(mode="json")
        self.by_tune_id[tune_id] = TrialRecord(
            key=key,
            trial_id=trial_id_for(self.spec.name, key),
            phase="final",
            cell_id=cell.cell_id,
            index=seed,
            config=config,
            params=dict(params),
        )
        self.progress()
        return {"trial": config, "name": run_name(self.by_tune_id[tune_id])}

    def post_failed(self, key: str, kind: str, message: str) -> None:
        rec = self.records.load("final", key)
        rec["payload"].setdefault("post_errors", []).append(f"{kind}: {message}")
        self.records.save_dict(rec)

    def post_done(self, key: str, kind: str, rows: list[dict[str, Any]]) -> None:
        from study.trial.evaluate import gradient_masking_row

        rec = self.records.load("final", key)
        evals = rec["payload"]["eval_rows"]
        evals.extend(rows)
        if kind == "transfer":
            # The flag now also sees the transfer attack: recompute it.
            evals[:] = [r for r in evals if r["metric"] != "gradient_masking"]
            evals.append(gradient_masking_row(evals))
        self.records.save_dict(rec)
        self.progress()


def post_jobs(spec: StudySpec, ctx: StudyContext) -> list[tuple[str, str, tuple[Any, ...]]]:
    """(record key, "transfer" | "distill", task args) for every post-phase evaluation still to do:
    transfer attacks crafted on the ce model of the same cell and seed, and distillation of every
    completed final model. Skips what earlier (interrupted) runs already did."""
    want_transfer = "transfer" in spec.evaluate.attacks and bool(spec.evaluate.eps)
    if not (want_transfer or spec.distill):
        return []
    records = ctx.records.load_all("final")
    done = {k: r for k, r in records.items() if r["status"] == "completed" and r.get("payload")}
    by_cell_seed = {(r["cell_id"], r["index"]): r for r in done.values()}
    jobs: list[tuple[str, str, tuple[Any, ...]]] = []
    for key, rec in done.items():
        conditions = {row["condition"] for row in rec["payload"]["eval_rows"]}
        cell = ctx.cells.get(rec["cell_id"])
        if cell is None:
            continue
        if want_transfer and cell.regularizer != "ce" and "transfer" not in conditions:
            source = by_cell_seed.get((cell.reference("ce").cell_id, rec["index"]))
            if source is not None:
                jobs.append((key, "transfer", (rec["config"], source["config"])))
        if spec.distill and "distill" not in conditions:
            jobs.append((key, "distill", (rec["config"], spec.distill.model_dump())))
    return jobs


def member_id(tune_id: str, index: int) -> str:
    """The id of a pack's member `index`: where its record lives in ``by_tune_id``."""
    return f"{tune_id}~{index}"


class TrialNames:
    """Tune's trial_name_creator / trial_dirname_creator: the trial's config carries its readable name
    (Tune copies these callables, so they cannot look anything up in the driver's context); the
    directory name is the same without ``/`` plus Tune's id (a resumed trial gets a new directory)."""

    @staticmethod
    def name(trial: Any) -> str:
        return str(trial.config.get("name") or trial.trial_id)

    @staticmethod
    def dirname(trial: Any) -> str:
        return (
            re.sub(r"[^A-Za-z0-9_.#-]+", "_", TrialNames.name(trial)).replace("#", "") + f"_{trial.trial_id}"
        )
