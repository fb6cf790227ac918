"""The live view of a running study: per-cell progress (running / completed / pruned / failed, best value
of the search metric in its own direction, ETA) in a rich Live table that re-renders on its own clock,
or one plain line per ended trial (wall-clock time, value of the metric) with --quiet. The post phase
(transfer attacks, distillation) reports each finished job."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from study.spec import StudySpec
from study.sweep.cells import expand_cells, planned_counts
from study.vocabulary import ADVERSARIAL_MODES, NOISE_KINDS

_SHORT_NOISE = {**NOISE_KINDS, **ADVERSARIAL_MODES}


def _short_reg(name: str) -> str:
    """ "label_smoothing" -> "ls"; one-word names stay as they are."""
    words = [w for w in name.split("_") if w]
    return "".join(w[0] for w in words) if len(words) > 1 else name


def _short_noise(setting: str) -> str:
    """ "symmetric:0.4" -> "sym:0.4", "adversarial-confident:0.2" -> "adv-conf:0.2"."""
    head, sep, rate = setting.partition(":")
    return "-".join(_SHORT_NOISE.get(p, p) for p in head.split("-")) + sep + rate


def short_names(cell_ids: list[str]) -> dict[str, str]:
    """Cell ids ("dataset/model/regularizer/noise", then "/r<k>" for a search replica) as short names
    that fit a narrow terminal: dataset and model only when the study has several, regularizers
    abbreviated unless two would collide, the replica as "r<k>"."""
    parts = [cid.split("/") for cid in cell_ids]
    if not parts or any(len(p) not in (4, 5) for p in parts):
        return {cid: cid for cid in cell_ids}
    keep = [len({p[i] for p in parts}) > 1 for i in range(2)]
    regs = {p[2] for p in parts}
    abbrev = {r: _short_reg(r) for r in regs}
    if len(set(abbrev.values())) < len(regs):
        abbrev = {r: r for r in regs}
    out = {}
    for cid, (ds, model, reg, noise, *replica) in zip(cell_ids, parts, strict=True):
        head = [x for x, k in zip((ds, model), keep, strict=True) if k]
        out[cid] = " ".join([*head, abbrev[reg], _short_noise(noise), *replica])
    return out


def startup_line(spec: StudySpec) -> str:
    """What `study run` prints at once, before Ray's start takes its seconds."""
    cells = expand_cells(spec)
    planned = planned_counts(spec, cells)
    best = "max" if spec.search.direction == "maximize" else "min"
    replicas = spec.search.replicas
    n_cells = f"{len(cells) // replicas} cells x {replicas} search replicas" if replicas > 1 else ""
    n_cells = n_cells or f"{len(cells)} cells"
    seed = f", study seed {spec.seed}" if spec.seed else ""
    return (
        f"study {spec.name}: {n_cells}, {planned['search']} search + {planned['final']} final "
        f"trials, {best} {spec.search.metric}{seed}; starting Ray"
    )


def _fmt_s(seconds: float) -> str:
    s = int(round(seconds))
    return (
        f"{s // 3600}h{s % 3600 // 60:02d}m"
        if s >= 3600
        else f"{s // 60}m{s % 60:02d}s"
        if s >= 60
        else f"{s}s"
    )


class LiveView:
    """Per-cell progress (running / completed / pruned / failed, best so far, ETA).

    The rich Live re-renders ``table()`` on its own refresh thread, so the clock and the ETA move even
    when no trial event arrives. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        spec: StudySpec,
        ctx_getter: Callable[[], Any],
        console: Console,
        quiet: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec, self.ctx_getter, self.console, self.quiet, self.clock = (
            spec,
            ctx_getter,
            console,
            quiet,
            clock,
        )
        self.live: Live | None = None
        self.t0 = clock()
        self.seen_done: set[str] = set()
        cells = expand_cells(spec)
        self.planned = planned_counts(spec, cells)
        self.names = short_names([c.cell_id for c in cells])
        self.metric, self.maximize = spec.search.metric, spec.search.direction == "maximize"
        self.post: tuple[int, int] | None = None  # (done, total) once the post phase has started
        self.post_t0: float | None = None

    def __enter__(self) -> LiveView:
        if not self.quiet:
            self.live = Live(
                console=self.console, refresh_per_second=2, transient=False, get_renderable=self.table
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def __call__(self) -> None:
        """A trial event (asked, epoch, ended): quiet mode prints the trials that have just ended; the
        live table redraws now rather than at its next tick."""
        ctx = self.ctx_getter()
        if ctx is None:
            return
        if self.quiet:
            for rec in list(ctx.by_tune_id.values()):
                if rec.ended_at is not None and rec.key not in self.seen_done:
                    self.seen_done.add(rec.key)
                    self.console.print(self.trial_line(rec), highlight=False)
        elif self.live is not None:
            self.live.refresh()

    def _stamp(self) -> str:
        return f"{time.strftime('%H:%M:%S', time.localtime(self.clock()))} +{_fmt_s(self.clock() - self.t0)}"

    def trial_line(self, rec: Any) -> str:
        """One --quiet line: time, phase, cell, trial, status, value of the metric, trial wall time."""
        payload = rec.payload or {}
        value = payload.get("best_value")
        rows = [r for r in rec.epoch_rows if r.get(self.metric) is not None]
        if value is None and rows:  # a pruned trial: its last reported value
            value = rows[-1][self.metric]
        shown = f" {self.metric}={value:.4f}" if value is not None else ""
        wall = payload.get("wall_s") or (rec.ended_at - rec.started_at if rec.ended_at else None)
        took = f" ({_fmt_s(wall)})" if wall else ""
        name = self.names.get(rec.cell_id, rec.cell_id)
        return f"{self._stamp()} {rec.phase} {name} #{rec.index}: {rec.status}{shown}{took}"

    def post_progress(self, done: int, total: int, kind: str = "", key: str = "", error: str = "") -> None:
        """The post phase (transfer attacks, distillation): `done` of `total` jobs finished."""
        self.post = (done, total)
        if self.post_t0 is None:
            self.post_t0 = self.clock()
        if self.quiet:
            if not done:
                line = f"post phase: {total} jobs (transfer attacks, distillation)"
            else:
                _, cell_id, seed = (key.split("|") + ["", ""])[:3]
                what = f"{kind} {self.names.get(cell_id, cell_id)} #{seed}"
                line = f"post {done}/{total} {what}" + (f": failed ({error})" if error else ": done")
            self.console.print(f"{self._stamp()} {line}", highlight=False)
        elif self.live is not None:
            self.live.refresh()

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b

    def table(self) -> Table:
        ctx = self.ctx_getter()
        arrow = "max" if self.maximize else "min"
        t = Table(title=f"{self.spec.name} (s: search, f: final)", expand=False, min_width=72)
        for col, just in (
            ("cell", "left"),
            ("run", "right"),
            ("done", "right"),
            ("pruned", "right"),
            ("fail", "right"),
            (f"best: {arrow} {self.metric}", "right"),
        ):
            t.add_column(col, justify=just, overflow="ellipsis", no_wrap=True, max_width=32)
        recs = list(ctx.by_tune_id.values()) if ctx is not None else []
        by_cell: dict[tuple[str, str], Counter] = {}
        best: dict[tuple[str, str], float] = {}
        for rec in recs:
            k = (rec.phase, rec.cell_id)
            by_cell.setdefault(k, Counter())[rec.status] += 1
            v = (rec.payload or {}).get("best_value")
            if v is not None and (k not in best or self._better(v, best[k])):
                best[k] = v
        for (phase, cell_id), c in sorted(by_cell.items(), key=lambda kv: (kv[0][0] != "search", kv[0][1])):
            b = best.get((phase, cell_id))
            t.add_row(
                f"{phase[0]} {self.names.get(cell_id, cell_id)}",
                *(str(n) for n in (c["running"], c["completed"], c["pruned"], c["failed"] + c["diverged"])),
                f"{b:.4f}" if b is not None else "-",
            )
        t.caption = self.caption(recs)
        return t

    def caption(self, recs: list[Any]) -> str:
        """Trials ended, epochs trained, elapsed time and the ETA (``eta``); in the post phase its jobs."""
        done = sum(1 for r in recs if r.ended_at is not None)
        total = self.planned["search"] + self.planned["final"]
        trained = sum(len(r.epoch_rows) for r in recs)
        text = f"{done}/{total} trials ended, {trained} epochs, {_fmt_s(self.clock() - self.t0)} elapsed"
        if self.post is None:
            return text + f", ETA {self.eta(recs)}"
        post_done, post_total = self.post
        took = self.clock() - (self.post_t0 or self.clock())
        post_eta = _fmt_s(took / post_done * (post_total - post_done)) if post_done else "-"
        return text + f", post {post_done}/{post_total} jobs, ETA {post_eta}"

    def eta(self, recs: list[Any]) -> str:
        """Time left from measured durations, never from elapsed time: the epochs still to train
        (running trials' remaining epochs + trials not started x their epochs; pruning can only make it
        shorter) x the mean measured seconds per epoch / the trials training at once (pack members
        count one each: a pack's epoch trains all of them)."""
        walls = [r["wall_s"] for rec in recs for r in rec.epoch_rows if r.get("wall_s")]
        if not walls:
            return "-"
        epochs = {"search": self.spec.train.epochs, "final": self.spec.final.epochs or self.spec.train.epochs}
        running = [r for r in recs if r.ended_at is None]
        left = sum(max(epochs.get(r.phase, 0) - len(r.epoch_rows), 0) for r in running)
        for phase, n in epochs.items():
            left += max(self.planned[phase] - sum(1 for r in recs if r.phase == phase), 0) * n
        return _fmt_s(sum(walls) / len(walls) * left / max(len(running), 1))
