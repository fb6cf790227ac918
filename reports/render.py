"""Report tables: rich (terminal, fits 80 columns), markdown and LaTeX from one table model.

One table per question and (dataset, model): rows = regularizers (ce first), columns = noise
settings; per-corruption accuracy instead gets one table per (dataset, model, noise setting) with the
corruptions as columns (accuracy averaged over the severities, then over seeds; reference.md defines
no corruption-error normalisation such as mCE, so none is shown). A value cell is "mean ± 95% CI
half-width" over final-phase seeds, with the difference to CE of the same setting and a significance
mark after Holm correction (* p_adj < 0.05, ** < 0.01). The best mean of each column is bold (lower
is better for ECE/NLL-like metrics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from reports.answer import Section, design_line, sections, terminal_lines
from reports.build import Study
from reports.findings import scale
from reports.stats import REFERENCE, best_trials, corruption_mask, corruption_summary, mark, summarize
from study import vocabulary as vocab
from study.vocabulary import HIGHER, NEITHER


def questions() -> list[tuple[str, list[tuple[str, str, str, str, int]]]]:
    """(question, [(split, condition, metric, label, better)]) for every question of the vocabulary,
    read at each build so that a metric added there reaches the next report; robustness adds one row
    per attack/corruption level found in the results (see _specs)."""
    return [
        (q, [(m.split, m.condition, m.name, m.label, m.better) for m in vocab.metrics_for(q)])
        for q in vocab.QUESTIONS
        if q != vocab.Q_CORRUPTIONS
    ]


_KIND_ORDER = tuple(vocab.NOISE_KINDS)
ROBUST_CONDITIONS = vocab.ROBUSTNESS_CONDITIONS
_ABBREV = {**vocab.NOISE_KINDS, **vocab.ADVERSARIAL_MODES}


@dataclass
class Value:
    """One table cell: a mean over seeds with its CI half-width, the paired difference to the reference
    and its mark (reports.stats.mark); ``scale`` 100 shows a [0, 1] metric in % (differences in points)."""

    mean: float
    half: float = math.nan
    delta: float = math.nan
    stars: str = ""
    is_ref: bool = False
    best: bool = False
    scale: float = 1.0

    def level(self, v: float) -> str:
        return f"{self.scale * v:.1f}" if self.scale == 100.0 else _fmt(v)

    def difference(self) -> str:
        return f"{self.scale * self.delta:+.1f}" if self.scale == 100.0 else f"{self.delta:+.3f}"


@dataclass
class Table:
    """A rendered-agnostic table: ``rows`` hold (row label, cells); a cell is a Value, text or None."""

    question: str
    title: str
    columns: list[str]
    rows: list[tuple[str, list[Value | str | None]]] = field(default_factory=list)
    first: str = "regularizer"
    noise_columns: bool = True  # columns are noise settings (abbreviated in narrow terminals)


def abbreviate(setting: str) -> str:
    """Short header for a noise setting: "adversarial-confident:0.2" -> "adv-conf 0.2"."""
    head, _, rate = setting.partition(":")
    short = "-".join(_ABBREV.get(p, p) for p in head.split("-"))
    return f"{short} {rate}" if rate else short


def _order_settings(df: pd.DataFrame) -> list[str]:
    keys = df.drop_duplicates("noise_setting")[["noise_setting", "noise_kind", "noise_rate"]]
    kind = keys["noise_kind"].map(lambda k: _KIND_ORDER.index(k) if k in _KIND_ORDER else len(_KIND_ORDER))
    keys = keys.assign(_k=kind).sort_values(["_k", "noise_kind", "noise_rate", "noise_setting"])
    return keys["noise_setting"].tolist()


def _order_regs(regs, first: str = REFERENCE) -> list[str]:
    regs = sorted(set(pd.unique(pd.Series(regs)).tolist()))
    return ([first] if first in regs else []) + [r for r in regs if r != first]


def _value_table(
    question: str, title: str, sub: pd.DataFrame, regs: list[str], cols: list[str], better: int,
    column: str = "noise_setting",
) -> Table:  # fmt: skip
    """Rows = regs (the reference first), columns = values of the summary column `column` (noise
    settings unless told); each cell vs the summary rows' reference."""
    table = Table(question, title, cols, noise_columns=column == "noise_setting")
    by = {(r.regularizer, getattr(r, column)): r for r in sub.itertuples(index=False)}
    cells: dict[tuple[str, str], Value] = {}
    for (reg, ns), r in by.items():
        cells[reg, ns] = Value(
            mean=float(r.mean), half=float(r.ci_high - r.mean) if pd.notna(r.ci_high) else math.nan,
            delta=float(r.diff) if pd.notna(r.diff) else math.nan,
            stars=mark(r.verdict, r.p_adjusted) if isinstance(r.verdict, str) else "",
            is_ref=reg == r.reference, scale=scale(r.metric),
        )  # fmt: skip
    if better != NEITHER:
        for ns in cols:
            vals = [
                (v.mean * better, reg) for (reg, n), v in cells.items() if n == ns and np.isfinite(v.mean)
            ]
            if len(vals) > 1:
                cells[max(vals)[1], ns].best = True
    for reg in regs:
        table.rows.append((reg, [cells.get((reg, ns)) for ns in cols]))
    return table


def _economics(trials: pd.DataFrame, regs: list[str]) -> Table:
    search = trials[trials["phase"] == "search"]
    cols = ["trials", "done", "pruned", "ep. saved", "failed", "diverged"]
    title = "search trials; epochs saved = Σ over pruned (max_epochs - epochs)"
    table = Table("Search economics", title, cols, noise_columns=False)
    for reg in regs:
        s = search[search["regularizer"] == reg]
        pruned = s[s["status"] == "pruned"]
        n = len(s)
        row = [
            str(n),
            str(int((s["status"] == "completed").sum())),
            f"{100 * len(pruned) / n:.0f}%" if n else "-",
            str(int((pruned["max_epochs"] - pruned["epochs"]).sum())),
            str(int((s["status"] == "failed").sum())),
            str(int((s["status"] == "diverged").sum())),
        ]
        table.rows.append((reg, row))
    return table


_TABLE_COLS = ["dataset", "model", "regularizer", "noise_setting", "split", "condition", "severity", "metric",
               "mean", "ci_high", "reference", "diff", "p_adjusted", "verdict"]  # fmt: skip


def _specs(
    question: str, index: dict, dataset: str, model: str
) -> list[tuple[str, str, float, str, str, int]]:
    """(split, condition, severity, metric, label, better) of the tables answering ``question``."""
    fixed = [
        (s, c, np.nan, m, lab, b) for q, items in questions() if q == question for s, c, m, lab, b in items
    ]
    if question != vocab.Q_ROBUSTNESS:
        return fixed
    out = []
    for cond in sorted(ROBUST_CONDITIONS):
        sub = index.get((dataset, model, "test", cond, "accuracy"))
        if sub is None:
            continue
        for sev in sorted(sub["severity"].unique(), key=lambda v: -np.inf if pd.isna(v) else v):
            what = "level" if cond == "corruption_mean" else "eps"
            label = f"{cond}, {what} {sev:g}: accuracy" if pd.notna(sev) else f"{cond}: accuracy"
            out.append(("test", cond, sev, "accuracy", label, HIGHER))
    return out + fixed


CORRUPTION_QUESTION = vocab.Q_CORRUPTIONS


def _levels(severities: pd.Series) -> str:
    """ "1-5" for a contiguous run of severities, else "1, 3, 5"."""
    levels = sorted(int(v) for v in pd.unique(severities))
    if len(levels) > 2 and levels == list(range(levels[0], levels[-1] + 1)):
        return f"{levels[0]}-{levels[-1]}"
    return ", ".join(map(str, levels))


def _corruption_tables(study: Study, reference: str) -> dict[tuple[str, str], list[Table]]:
    """Per (dataset, model): one table per noise setting, rows = regularizers, columns = corruptions."""
    ev = study.evals[corruption_mask(study.evals)]
    final = study.trials[(study.trials["phase"] == "final") & (study.trials["status"] == "completed")]
    ev = ev.merge(final[["trial_id", "dataset", "model"]], on="trial_id")
    if ev.empty:
        return {}
    summary = corruption_summary(study.trials, ev, study=study.name, reference=reference)
    out: dict[tuple[str, str], list[Table]] = {}
    for (dataset, model), tr in study.trials.groupby(["dataset", "model"], sort=True):
        rows = ev[(ev["dataset"] == dataset) & (ev["model"] == model)]
        if rows.empty:
            continue
        names = pd.unique(rows["condition"]).tolist()  # the order the study evaluated them in
        what = f"accuracy per corruption, mean over severities {_levels(rows['severity'])}"
        sub = summary[(summary["dataset"] == dataset) & (summary["model"] == model)]
        regs = _order_regs(tr["regularizer"], reference)
        for ns in _order_settings(tr):
            cells = sub[sub["noise_setting"] == ns]
            if len(cells):
                title = f"{dataset} / {model}, noise {ns}: {what}"
                table = _value_table(
                    CORRUPTION_QUESTION, title, cells, regs, names, HIGHER, column="condition"
                )
                out.setdefault((dataset, model), []).append(table)
    return out


def _best_strength(best: dict, regs: list[str], cols: list[str], where: str) -> Table:
    table = Table("Search economics", f"{where}: best strength (search phase)", cols)
    for reg in regs:
        vals: list[Value | str | None] = []
        for ns in cols:
            v = best.get((reg, ns))
            vals.append(f"{v:.3g}" if v is not None and pd.notna(v) else "-")
        table.rows.append((reg, vals))
    return table


def _best_config(best: pd.DataFrame, regs: list[str], where: str) -> Table:
    """The hyperparameters the final trials used, per cell (lr included, schedules as start->end)."""
    table = Table("Search economics", f"{where}: configuration of the final trials", ["configuration"],
                  first="cell", noise_columns=False)  # fmt: skip
    for _, r in best.sort_values(["regularizer", "noise_setting"]).iterrows():
        if r["regularizer"] in regs:
            label = f"{r['regularizer']} / {r['noise_setting']}"
            table.rows.append((label, [r["params_text"] if isinstance(r["params_text"], str) else "-"]))
    return table


def build_tables(
    study: Study, summary: pd.DataFrame | None = None, *, reference: str = REFERENCE
) -> list[Table]:
    """All report tables of a study, every difference and mark vs ``reference``: questions in order,
    then one table per (dataset, model) and metric.

    Args:
        summary: ``summarize`` output to draw from (its rows with this reference are used; by default
            computed from the study's trials and evals: the report never needs summary.parquet).

    Per-corruption tables are computed from ``study.evals`` (the summary keeps each severity apart); a
    study without corruption rows has no such section.
    """
    if summary is None:
        summary = summarize(study.trials, study.evals, reference=reference, margins=study.margins)
    summary = summary[summary["reference"] == reference]
    # Index the summary once: filtering a 100k-row frame per table dominated the render time.
    keys = ["dataset", "model", "split", "condition", "metric"]
    index = dict(iter(summary[_TABLE_COLS].groupby(keys, sort=False))) if len(summary) else {}
    best_all = best_trials(study.trials)
    groups = [
        (key, tr, _order_regs(tr["regularizer"], reference), _order_settings(tr))
        for key, tr in study.trials.groupby(["dataset", "model"], sort=True)
    ]
    tables: list[Table] = []
    questions = list(vocab.QUESTIONS)
    per_corruption = _corruption_tables(study, reference)
    for question in [*questions, "Search economics"]:
        for (dataset, model), tr, regs, cols in groups:
            where = f"{dataset} / {model}"
            if question == CORRUPTION_QUESTION:
                tables += per_corruption.get((dataset, model), [])
                continue
            if question == "Search economics":
                econ = _economics(tr, regs)
                econ.title = f"{where}: {econ.title}"
                b = best_all[(best_all["dataset"] == dataset) & (best_all["model"] == model)]
                best = dict(
                    zip(zip(b["regularizer"], b["noise_setting"], strict=True), b["strength"], strict=True)
                )
                tables += [econ, _best_strength(best, regs, cols, where)]
                if "params_text" in b.columns and b["params_text"].notna().any():
                    tables.append(_best_config(b, regs, where))
                continue
            for split, cond, sev, metric, label, better in _specs(question, index, dataset, model):
                sub = index.get((dataset, model, split, cond, metric))
                if sub is None:
                    continue
                sub = sub[sub["severity"].isna()] if pd.isna(sev) else sub[sub["severity"] == sev]
                if len(sub):
                    tables.append(_value_table(question, f"{where}: {label}", sub, regs, cols, better))
    return tables


def header_lines(study: Study, *, tables: bool = True, reference: str = REFERENCE) -> list[str]:
    """Report header: study, status, its design (seed, search budget, seeds, pack size), a warning for
    partial results and (with ``tables``) how to read the tables."""
    n = len(study.trials)
    lines = [f"Study {study.name}: status {study.status}, {n} trials", design_line(study)]
    if study.partial:
        lines.append("PARTIAL RESULTS: the study has not completed; numbers may change.")
    # Things the run wanted the reader to know, e.g. a cell with no final trials (manifest "notes").
    lines.extend(f"Note: {note}" for note in study.manifest.get("notes", []))
    if not tables:
        return lines
    ref = vocab.short_name(reference)
    lines.append(
        "Tables: mean ± 95% t-CI half-width over final seeds, [0, 1] metrics in %; second value: paired "
        f"difference to {ref} (points for [0, 1] metrics); paired t-test over seeds (scipy ttest_rel), "
        f"Holm over the regularizers vs {ref}: * p_adj < 0.05, ** p_adj < 0.01. Bold: best in column."
    )
    return lines


def _fmt(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.4g}"


def _rich_cell(c: Value | str | None) -> Text:
    if c is None:
        return Text("-", style="dim")
    if isinstance(c, str):
        return Text(c)
    out = Text(c.level(c.mean), style="bold" if c.best else "")
    if np.isfinite(c.half):
        out.append(f"±{c.level(c.half)}")
    if c.is_ref:
        out.append("\nref", style="dim")
    elif np.isfinite(c.delta):
        out.append(f"\n{c.difference()}{c.stars}", style="green" if c.stars else "dim")
    return out


def _chunks(t: Table, width: int) -> list[list[int]]:
    """Column indices split into groups whose estimated rich width (cell + 3 padding/rule) fits ``width``."""
    widths = []
    for i, name in enumerate(t.columns):
        texts = [c if isinstance(c, str) else "0.000±0.000" for _, cells in t.rows for c in [cells[i]] if c]
        widths.append(max([len(abbreviate(name) if t.noise_columns else name), 1, *map(len, texts)]) + 2)
    groups: list[list[int]] = [[]]
    used = 0
    for i, w in enumerate(widths):
        if groups[-1] and used + w > width:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += w
    return groups


_STYLES = {
    "title": "bold",
    "group": "bold cyan",
    "config": "dim",
    "line": "",
    "warning": "yellow",
    "note": "dim",
}


@dataclass(frozen=True)
class Options:
    """What a report shows: the findings vs ``reference`` (``all_pairs``: every pair; ``pair``: one pair
    at every setting), then with ``full`` every table."""

    full: bool = True
    reference: str = REFERENCE
    all_pairs: bool = False
    pair: tuple[str, str] | None = None

    def sections(self, study: Study) -> list[Section]:
        return sections(study, self.reference, all_pairs=self.all_pairs, pair=self.pair)


def render_rich(
    study: Study, console: Console, options: Options = Options(), summary: pd.DataFrame | None = None
) -> None:
    """Print the header and the findings, then (``options.full``) all tables; a table too wide for the
    console is split into several column groups."""
    full, reference = options.full, options.reference
    for i, line in enumerate(header_lines(study, tables=full, reference=reference)):
        console.print(line, style="bold yellow" if "PARTIAL" in line else "bold" if i == 0 else "dim")
    for section in options.sections(study):
        for kind, text in terminal_lines(section):
            console.print(text, style=_STYLES[kind], highlight=False)
    if not full:
        return
    tables = build_tables(study, summary, reference=reference)
    question = None
    for t in tables:
        if t.question != question:
            question = t.question
            console.rule(question)
        first_w = min(max([len(t.first), *(len(r) for r, _ in t.rows)]), 22)
        groups = _chunks(t, console.width - first_w - 2)
        for chunk, cols in enumerate(groups):
            suffix = f" ({chunk + 1}/{len(groups)})" if len(groups) > 1 else ""
            rt = RichTable(title=t.title + suffix, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False)
            rt.add_column(t.first, overflow="fold", min_width=first_w, max_width=first_w)
            for c in cols:
                rt.add_column(abbreviate(t.columns[c]) if t.noise_columns else t.columns[c], overflow="fold",
                              justify="right")  # fmt: skip
            for label, cells in t.rows:
                rt.add_row(label, *(_rich_cell(cells[c]) for c in cols))
            console.print(rt)
