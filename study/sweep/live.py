"""The live view of a running study: per-cell progress (running / completed / pruned / failed, best so
far, ETA) in a rich Live table, or one plain line per ended trial with --quiet."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from study.spec import StudySpec
from study.sweep.cells import expand_cells, planned_counts


class LiveView:
    """Per-cell progress (running / completed / pruned / failed, best so far, ETA), throttled."""

    def __init__(self, spec: StudySpec, ctx_getter: Any, console: Console, quiet: bool) -> None:
        self.spec, self.ctx_getter, self.console, self.quiet = spec, ctx_getter, console, quiet
        self.live: Live | None = None
        self.last = 0.0
        self.t0 = time.time()
        self.seen_done: set[str] = set()
        self.planned = planned_counts(spec, expand_cells(spec))

    def __enter__(self) -> LiveView:
        if not self.quiet:
            self.live = Live(console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self.table())
            self.live.__exit__(*exc)

    def __call__(self) -> None:
        ctx = self.ctx_getter()
        if ctx is None:
            return
        if self.quiet:
            for rec in ctx.by_tune_id.values():
                if rec.ended_at is not None and rec.key not in self.seen_done:
                    self.seen_done.add(rec.key)
                    self.console.print(
                        f"{rec.phase} {rec.cell_id} #{rec.index}: {rec.status}", highlight=False
                    )
            return
        now = time.time()
        if self.live is not None and now - self.last > 0.5:
            self.last = now
            self.live.update(self.table())

    def table(self) -> Table:
        ctx = self.ctx_getter()
        t = Table(title=f"{self.spec.name}", expand=False)
        for col in ("phase/cell", "run", "done", "pruned", "fail", "best"):
            t.add_column(col, overflow="fold")
        if ctx is None:
            return t
        by_cell: dict[tuple[str, str], Counter] = {}
        best: dict[tuple[str, str], float] = {}
        for rec in ctx.by_tune_id.values():
            k = (rec.phase, rec.cell_id)
            by_cell.setdefault(k, Counter())[rec.status] += 1
            if rec.payload and rec.payload.get("best_value") is not None:
                v = rec.payload["best_value"]
                best[k] = max(best.get(k, v), v)
        done = sum(1 for r in ctx.by_tune_id.values() if r.ended_at is not None)
        total = self.planned["search"] + self.planned["final"]
        for (phase, cell_id), c in sorted(by_cell.items(), key=lambda kv: (kv[0][0] != "search", kv[0][1])):
            b = best.get((phase, cell_id))
            t.add_row(
                f"{phase[0]} {cell_id}",
                str(c["running"]),
                str(c["completed"]),
                str(c["pruned"]),
                str(c["failed"] + c["diverged"]),
                f"{b:.3f}" if b is not None else "-",
            )
        elapsed = time.time() - self.t0
        eta = elapsed / done * (total - done) if done else float("nan")
        t.caption = f"{done}/{total} trials ended, {elapsed:.0f}s elapsed, ETA {eta:.0f}s"
        return t
