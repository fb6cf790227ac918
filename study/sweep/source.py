"""Which trial runs next: a cell's search trials, then its final seeds; packs of them when asked.

Ray-free: the Tune searcher (study/sweep/tune.py) only forwards to it, so tests drive it the way Tune
does (one ``suggest`` per free slot, results told back) without starting Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optuna.trial import TrialState

from study.spec import StudySpec
from study.sweep.cells import Cell
from study.sweep.context import StudyContext, member_id
from study.sweep.optuna_cells import CellStudies
from study.sweep.records import trial_key
from study.sweep.seeds import SeedPlan
from study.vocabulary import FINAL_DONE_STATUSES

# The sentinel TrialSource.suggest returns when no trial is left (Tune's Searcher.FINISHED).
FINISHED = "FINISHED"
_DONE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class TrialSource:
    """Search trials from each cell's Optuna study (fewest asked first) until every cell has its budget;
    then, cell by cell as each one's search ends, that cell's final trials.

    Ray-free: the Tune searcher (study/sweep/tune.py) only forwards to it, so tests drive it the way
    Tune does (one ``suggest`` per free slot, each end told to ``StudyContext.trial_ended``) without
    starting Ray.
    """

    def __init__(
        self,
        spec: StudySpec,
        cells: list[Cell],
        studies: CellStudies,
        ctx: StudyContext,
        on_search_done: Callable[[], None] = lambda: None,
    ) -> None:
        self.spec, self.cells, self.studies, self.ctx = spec, cells, studies, ctx
        self.on_search_done = on_search_done
        self.orphans: list[tuple[Cell, Any]] = []
        recorded = ctx.records.load_all("search")
        for cell in cells:
            for frozen in studies.trials(cell.cell_id, (TrialState.RUNNING, TrialState.WAITING)):
                rec = recorded.get(trial_key("search", cell.cell_id, frozen.number))
                if rec is not None and rec["status"] != "running":
                    # The driver died between writing the record and telling Optuna: tell it now
                    # instead of running the trial again.
                    studies.tell_recorded(cell.cell_id, frozen, rec)
                else:
                    self.orphans.append((cell, frozen))
        self.final_done = {
            k for k, r in ctx.records.load_all("final").items() if r["status"] in FINAL_DONE_STATUSES
        }
        self.search_ended: set[str] = set()  # cells whose search trials have all ended
        self.final_queue: list[tuple[Cell, dict[str, Any], int]] = []
        self.final_params: dict[str, dict[str, Any]] = {}  # cell id -> the config its finals retrain
        self.queued: set[str] = set()  # final trial keys queued (or handed out) by this driver
        # How many final seeds each cell gets and why it stopped (the runner writes it to the manifest).
        self.seeds = SeedPlan(spec, cells)

    def remaining(self) -> int:
        """Trials still to run: the search budget not yet ended plus final trials not yet done."""
        search = sum(
            max(self.studies.budget(c) - len(self.studies.trials(c.cell_id, _DONE)), 0) for c in self.cells
        )
        final = sum(
            trial_key("final", c.cell_id, seed) not in self.final_done
            for c in self.cells
            for seed in range(1, self.spec.final.max_seeds + 1)
        )
        return search + final  # an upper bound with adaptive seeds: suggest says FINISHED early

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """The next trial's Tune config; with ``resources.trials_per_process`` > 1 a pack of up to that
        many trials of cells with the first one's model (one pack_key: a spec's cells share the data and
        training settings): re-attached orphans, new search trials of the cells asked least (spreading a
        pack over cells gives each cell's sampler the feedback of its earlier trials), or final seeds,
        a cell's own first."""
        packed = self.spec.resources.trials_per_process != 1
        first = self._next(member_id(trial_id, 0) if packed else trial_id)
        if first is None or first == FINISHED or not packed:
            return first
        rec = self.ctx.by_tune_id[member_id(trial_id, 0)]
        cell = self.ctx.cells[rec.cell_id]
        members = [first]
        while len(members) < self.pack_size(cell):
            more = self._next(member_id(trial_id, len(members)), like=cell, phase=rec.phase)
            if more is None or more == FINISHED:
                break
            members.append(more)
        return self.ctx.pack(trial_id, members)

    def refill(self, pack_id: str, free: int) -> list[dict[str, Any]]:
        """Up to `free` new search trials for a search pack whose members have ended (cells of its
        model, as a pack is filled); none for a final pack or once the search budget is asked."""
        ids = self.ctx.packs.get(pack_id, [])
        first = self.ctx.by_tune_id[ids[0]] if ids else None
        if first is None or first.phase != "search":
            return []
        new: list[dict[str, Any]] = []
        like = self.ctx.cells[first.cell_id]
        while len(new) < free:
            more = self._next(member_id(pack_id, len(ids)), like=like, phase="search")
            if more is None:
                break
            new.append({"id": member_id(pack_id, len(ids)), "trial": more["trial"]})
            ids.append(new[-1]["id"])
        return new

    def pack_size(self, cell: Cell) -> int:
        return self.spec.resources.pack_size(cell.model, self.spec.train.batch_size)

    def _next(self, trial_id: str, like: Cell | None = None, phase: str | None = None) -> Any:
        """The next trial; given `like` and `phase`, only one of that phase (final trials may train other
        epochs) of a cell with `like`'s model, and None rather than FINISHED when there is none."""

        def fits(cell: Cell) -> bool:
            return like is None or (cell.model, cell.model_options) == (like.model, like.model_options)

        def own_first(entry: tuple[Any, ...]) -> bool:  # sort key: `like`'s own cell before the others
            return like is not None and entry[0].cell_id != like.cell_id

        orphans = sorted((o for o in self.orphans if fits(o[0]) and phase != "final"), key=own_first)
        if orphans:
            self.orphans.remove(orphans[0])
            cell, frozen = orphans[0]
            return self.ctx.new_search_trial(trial_id, cell, self.studies.reattach(cell.cell_id, frozen))
        # One journal read per cell and suggestion (each read syncs with the journal file).
        cells = [c for c in self.cells if fits(c)]
        asked = {c.cell_id: len(self.studies.trials(c.cell_id)) for c in cells}
        open_cells = [c for c in cells if asked[c.cell_id] < self.studies.budget(c) and phase != "final"]
        if open_cells:
            cell = min(open_cells, key=lambda c: asked[c.cell_id])
            return self.ctx.new_search_trial(trial_id, cell, self.studies.ask(cell))
        if phase == "search":
            return None
        self.queue_finals()
        if not self.final_queue and len(self.search_ended) == len(self.cells):
            self._next_round()
        queued = sorted((q for q in self.final_queue if fits(q[0])), key=own_first)
        if queued:
            self.final_queue.remove(queued[0])
            cell, params, seed = queued[0]
            return self.ctx.new_final_trial(trial_id, cell, params, seed)
        if like is not None:
            return None
        # Fixed seeds: nothing more will be asked. Adaptive: running finals may still ask for a round.
        if len(self.search_ended) == len(self.cells) and (
            self.seeds.adaptive is None or not self._pending_finals()
        ):
            return FINISHED
        return None  # search or final trials that decide what comes next still run: ask again later

    def queue_finals(self) -> None:
        """Queue the final trials of every cell whose search has just ended (all its trials told); tell
        on_search_done when the last cell's search ends (each cell enters search_ended once)."""
        ended_before = len(self.search_ended)
        for cell in self.cells:
            if cell.cell_id in self.search_ended:
                continue
            if len(self.studies.trials(cell.cell_id, _DONE)) < self.studies.budget(cell):
                continue
            self.search_ended.add(cell.cell_id)
            params, _ = self.studies.best_params(cell)
            if not params and cell.searched:
                # Every search trial was pruned or failed: there is no configuration to retrain.
                states = [t.state for t in self.studies.trials(cell.cell_id)]
                self.ctx.notes.append(
                    f"{cell.cell_id}: no search trial completed ({states.count(TrialState.PRUNED)} pruned, "
                    f"{states.count(TrialState.FAIL)} failed or diverged), so it has no final trials"
                )
                continue
            self.final_params[cell.cell_id] = params
            self._queue_seeds(cell)
        if len(self.search_ended) == len(self.cells) > ended_before:
            self.on_search_done()

    def _queue_seeds(self, cell: Cell) -> None:
        for seed in self.seeds.wanted(cell):
            key = trial_key("final", cell.cell_id, seed)
            if key not in self.final_done and key not in self.queued:
                self.queued.add(key)
                self.final_queue.append((cell, self.final_params[cell.cell_id], seed))

    def _ended_finals(self) -> set[str]:
        live = {r.key for r in self.ctx.by_tune_id.values() if r.phase == "final" and r.ended_at is not None}
        return self.final_done | live

    def _pending_finals(self) -> bool:
        return bool(self.queued - self._ended_finals())

    def _next_round(self) -> None:
        """Adaptive seeds: once every wanted seed of a group has ended, ask the plan for more."""
        if self.seeds.adaptive is None:
            return
        ended = self._ended_finals()
        records = self.ctx.records.load_all("final")
        accuracy: dict[str, dict[int, float]] = {}
        for cell in self.cells:
            keys = [trial_key("final", cell.cell_id, s) for s in self.seeds.wanted(cell)]
            if cell.cell_id not in self.final_params or not all(k in ended for k in keys):
                continue
            accuracy[cell.cell_id] = {
                s: v for s, k in zip(self.seeds.wanted(cell), keys, strict=True)
                if (v := _test_accuracy(records.get(k))) is not None
            }  # fmt: skip
        for cell_id in self.seeds.advance(accuracy):
            self._queue_seeds(self.ctx.cells[cell_id])


def _test_accuracy(rec: dict[str, Any] | None) -> float | None:
    """Clean test accuracy of a final trial's record (None when it did not complete)."""
    if rec is None or rec.get("status") != "completed":
        return None
    for row in (rec.get("payload") or {}).get("eval_rows") or []:
        if (row["split"], row["condition"], row["metric"]) == ("test", "clean", "accuracy"):
            return float(row["value"])
    return None
