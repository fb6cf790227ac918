"""How many final seeds each cell gets: a fixed number, or adaptive rounds until its key comparison is
decided (``final: {seeds: {min, max, until: decided}}``).

Ray Tune's Repeater only averages a fixed number of repeats; here, after each round, a cell whose
comparison (its test accuracy - its reference cell's, paired over the seeds both have) is still
undecided gets one more seed, and so does the reference cell, until it is decided or the cell has
``max`` seeds. Decided as the report's verdicts (reports/verdicts.py): different when the 95% CI excludes
zero, equivalent when the 90% CI lies inside +-margin (the spec's ``margins.accuracy``, else the
vocabulary's).
Why each cell stopped is recorded (the manifest's ``final_seeds``). Ray-free.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from study.spec import AdaptiveSeeds, StudySpec
from study.sweep.cells import Cell
from study.vocabulary import margin_of


class SeedPlan:
    """The final seeds of every cell: ``wanted(cell)`` now, ``advance(values)`` after a round."""

    def __init__(self, spec: StudySpec, cells: list[Cell]) -> None:
        self.adaptive: AdaptiveSeeds | None = (
            spec.final.seeds if isinstance(spec.final.seeds, AdaptiveSeeds) else None
        )
        self.count = {c.cell_id: spec.final.first_seeds for c in cells}
        self.margin = margin_of("accuracy", spec.margins) or 0.0
        self.reasons: dict[str, str] = {}
        # A cell's reference is the reference regularizer's cell of the same data, model, noise and
        # search replica.
        self.groups: dict[tuple[str, str, str, int | None], list[Cell]] = {}
        for c in cells:
            self.groups.setdefault((c.dataset, c.model, c.noise.label, c.replica), []).append(c)

    def wanted(self, cell: Cell) -> range:
        # Final seeds start at 1: seed 0 trained the search trials, and re-using it would carry the
        # selection's luck (winner's curse) into the final estimate.
        return range(1, self.count[cell.cell_id] + 1)

    def advance(self, accuracy: dict[str, dict[int, float]]) -> list[str]:
        """Decide after a round: `accuracy[cell_id][seed]` holds the ended seeds' test accuracy (cells
        whose wanted seeds have not all ended are absent). Returns the cells that got one more seed."""
        if self.adaptive is None:
            return []
        more: list[str] = []
        for cells in self.groups.values():
            ref = next((c for c in cells if c.arm == self.adaptive.reference), None)
            if ref is None:
                for c in cells:
                    self.reasons.setdefault(c.cell_id, f"no {self.adaptive.reference} cell to compare with")
                continue
            open_cells = [c for c in cells if c is not ref and c.cell_id not in self.reasons]
            if ref.cell_id not in accuracy or any(c.cell_id not in accuracy for c in open_cells):
                continue  # the round is not over for this group
            for c in open_cells:
                reason = self._decide(accuracy[c.cell_id], accuracy[ref.cell_id], self.count[c.cell_id])
                if reason:
                    self.reasons[c.cell_id] = reason
                else:
                    self.count[c.cell_id] += 1
                    more.append(c.cell_id)
            if any(c.cell_id not in self.reasons for c in cells if c is not ref):
                self.count[ref.cell_id] = max(self.count[c.cell_id] for c in cells)
                more.append(ref.cell_id)
            else:
                self.reasons[ref.cell_id] = (
                    f"reference: {self.count[ref.cell_id]} seeds, every comparison ended"
                )
        return more

    def _decide(self, cell: dict[int, float], ref: dict[int, float], n_wanted: int) -> str | None:
        """A stop reason, or None to add a seed."""
        assert self.adaptive is not None
        seeds = sorted(set(cell) & set(ref))
        d = np.array([cell[s] - ref[s] for s in seeds], dtype=float)
        lo, hi = _paired_ci(d)
        ci = f"accuracy diff {100 * d.mean():+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}], n={len(d)}"
        if len(d) >= 2 and (lo > 0 or hi < 0):
            return f"decided: {ci}"
        lo90, hi90 = _paired_ci(d, level=0.90)
        if len(d) >= 2 and -self.margin < lo90 and hi90 < self.margin:
            return f"equivalent: {ci}, 90% CI within ±{100 * self.margin:.1f} pts"
        if n_wanted >= self.adaptive.max:
            return f"max seeds: {ci} still includes 0"
        return None

    def record(self) -> dict[str, Any]:
        return {cid: {"seeds": n, "stopped": self.reasons.get(cid, "fixed")} for cid, n in self.count.items()}


def _paired_ci(d: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    if len(d) < 2:
        return -math.inf, math.inf
    from scipy import stats  # here: every trial process imports this module (via tune.py), ~0.8 s

    half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)
