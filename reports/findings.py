"""The report's answer, per (dataset, model, noise setting) and question: the best regularizer against the
reference (against the runner-up when the reference is best) with both levels, the paired difference, its
95% CI, n, p raw / Holm-adjusted and the verdict; per setting, the largest significant harm (a
regularizer significantly worse than the reference on a question's metric); and the same lines for every
pair of regularizers (``pair_findings``: ``--all-pairs``, ``--compare A:B``), Holm over the pairs.

"Best" is the highest (lower-is-better metrics: the lowest) mean over final seeds; the test is the paired
t-test of reports/compare.py, Holm-adjusted over all regularizers vs the reference, so picking the best
mean does not shrink its p-value. Robustness is answered at the largest attack eps by the strongest
attack of each setting (the lowest mean accuracy over its regularizers), and by the corruption mean.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd

from reports.compare import GROUP, KEYS, NOSEV, compare, per_seed
from reports.configs import chosen_strengths
from reports.stats import DIFFERENT
from study import vocabulary as vocab

FLIPPED = {"better": "worse", "worse": "better", "higher": "lower", "lower": "higher"}
KeyRow = tuple[str, str, tuple[str, str, float, str], int]  # (question, label, key, better)


@dataclass
class Finding:
    """One comparison as the findings print it: ``a`` vs ``b`` on one question of one setting."""

    dataset: str
    model: str
    noise_setting: str
    question: str
    label: str
    metric: str
    better: int
    a: str  # the best regularizer; a harm's harmed one; a pair's first
    a_level: float  # mean over final seeds
    b: str | None  # None: the setting has one regularizer
    b_level: float
    diff: float  # a - b (paired seeds), in the metric's units
    ci_low: float
    ci_high: float
    n: int
    p: float
    p_adj: float
    n_above: int = 0  # paired seeds where a's value is above b's
    n_below: int = 0
    verdict: str = ""
    harm: bool = False
    units_needed: float = math.nan  # units (seeds or replicas) that would decide an undecided verdict
    strength_ratio: float = math.nan  # the two sides' strengths' ratio, when more than 2x apart

    @property
    def group(self) -> tuple[str, str, str]:
        return self.dataset, self.model, self.noise_setting

    @property
    def wins(self) -> int:
        """Paired seeds on which ``a`` is better than ``b`` (in the metric's direction)."""
        return self.n_above if self.better >= 0 else self.n_below

    def levels(self) -> str:
        """ "LS 65.5% vs CE 63.8%" """
        a = f"{vocab.short_name(self.a)} {level_text(self.metric, self.a_level)}"
        return (
            a
            if self.b is None
            else f"{a} vs {vocab.short_name(self.b)} {level_text(self.metric, self.b_level)}"
        )

    def difference(self) -> str:
        """ "+1.7 [-0.4, +3.8]": a - b in points for [0, 1] metrics, with its 95% CI."""
        if self.b is None or not math.isfinite(self.diff):
            return ""
        ci = f" [{diff_text(self.metric, self.ci_low)}, {diff_text(self.metric, self.ci_high)}]"
        return diff_text(self.metric, self.diff) + (ci if math.isfinite(self.ci_low) else "")

    def p_values(self, *, raw: bool = True) -> str:
        """ "p=.21/.63" (raw / Holm-adjusted; ``raw`` False: "p=.63", adjusted only); "" without a test."""
        if not math.isfinite(self.p):
            return ""
        return f"p={p_text(self.p)}/{p_text(self.p_adj)}" if raw else f"p={p_text(self.p_adj)}"

    def sentence(self, *, n: bool = True, raw: bool = True, wins: bool = False, unit: str = "seeds") -> str:
        """ "LS 65.5% vs CE 63.8% +1.7 [-0.4, +3.8] n=5 p=.21/.63 not significant"; ``wins`` adds the
        seeds on which a is better ("4/5 seeds") before the verdict."""
        parts = [
            self.levels(),
            self.difference(),
            f"n={self.n}" if n and self.b else "",
            self.p_values(raw=raw),
        ]
        parts.append(f"{self.wins}/{self.n} {unit}" if wins and self.b and self.n else "")
        return " ".join(p for p in [*parts, self.verdict_text()] if p)

    def verdict_text(self) -> str:
        """The verdict; an undecided one with the units (seeds, or replicas) that would decide it
        at the observed spread ("undecided n≈12")."""
        if self.verdict == "undecided" and math.isfinite(self.units_needed):
            word = f"undecided n≈{self.units_needed:.0f}"
        else:
            word = self.verdict
        return word + (f" (strengths {self.strength_ratio:.0f}x apart)" if self.strength_ratio > 2 else "")


def scale(metric: str) -> float:
    """100 for [0, 1] metrics (shown in % and their differences in points), else 1."""
    return 100.0 if metric in vocab.PERCENT_METRICS else 1.0


def level_text(metric: str, v: float) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{100 * v:.1f}%" if scale(metric) == 100.0 else _no_lead_zero(f"{v:.3f}")


def diff_text(metric: str, d: float) -> str:
    """ "+1.7" points for [0, 1] metrics, "+0.012" otherwise (never "-0.0")."""
    digits = 1 if scale(metric) == 100.0 else 3
    shown = round(scale(metric) * d, digits) + 0.0
    return _no_lead_zero(f"{shown:+.{digits}f}") if digits == 3 else f"{shown:+.{digits}f}"


def _no_lead_zero(text: str) -> str:
    """ "0.152" -> ".152", "-0.013" -> "-.013" (a one-line finding keeps to 80 columns)."""
    for sign in ("", "+", "-"):
        if text.startswith(sign + "0."):
            return sign + text[len(sign) + 1 :]
    return text


def p_text(p: float) -> str:
    """0.012 -> ".01", 0.0042 -> ".004", 3.8e-06 -> "4e-06": short p-values for one-line findings."""
    if not math.isfinite(p):
        return "-"
    if p >= 0.995:
        return "1"
    return f"{p:.2f}"[1:] if p >= 0.0095 else f"{p:.3f}"[1:] if p >= 0.00095 else f"{p:.0e}"


def _short_label(metric: str) -> str:
    return {"accuracy": "accuracy", "ece": "ECE", "memorisation_rate": "memorised", "r2": "R²",
            "student_accuracy": "distilled"}.get(metric, metric)  # fmt: skip


def _key_rows(values: pd.DataFrame) -> list[KeyRow]:
    """The rows the findings use: each question's metric; robustness: every attack at the largest eps
    (one per setting is kept, see ``_answered``) and the corruption mean at its harshest level."""
    out: list[KeyRow] = []
    present = values.drop_duplicates(KEYS)
    have = set(zip(*(present[c] for c in KEYS), strict=True))
    for question in vocab.QUESTIONS:
        if question == vocab.Q_ROBUSTNESS:
            att = present[(present["metric"] == "accuracy") & present["condition"].isin(vocab.ATTACKS)]
            if len(att):
                eps = att["severity"].max()
                for cond in (c for c in vocab.ATTACKS if ("test", c, eps, "accuracy") in have):
                    out.append((question, cond, ("test", cond, eps, "accuracy"), vocab.HIGHER))
            mean = present[present["condition"] == vocab.CORRUPTION_MEAN]
            if len(mean):  # one row per trial (no severity) in the final evaluation; else the harshest
                key = ("test", vocab.CORRUPTION_MEAN, mean["severity"].max(), "accuracy")
                out.append((question, "corruption", key, vocab.HIGHER))
            continue
        name = vocab.FINDING_METRICS.get(question)
        m = vocab.METRIC_BY_NAME.get(name or "")
        key = next((k for k in have if m and (k[0], k[1], k[3]) == (m.split, m.condition, name)), None)
        if m is not None and key is not None:
            out.append((question, _short_label(m.name), key, m.better))
    return out


def _answered(values: pd.DataFrame) -> Iterator[tuple[tuple[str, str, str], KeyRow, dict[str, float]]]:
    """(setting, key row, {regularizer: mean over seeds}) of every question a setting answers, settings
    in report order (clean first, then noise kinds in the vocabulary's order and by rate)."""
    means = values.groupby([*GROUP, *KEYS, "regularizer"], sort=False)["value"].mean().reset_index()
    by_key = dict(iter(means.groupby(KEYS, sort=False)))
    rows = _key_rows(values)
    attacks = [r for r in rows if r[2][1] in vocab.ATTACKS]
    strongest: dict[tuple, tuple[float, str]] = {}  # setting -> (mean accuracy over regularizers, attack)
    for _, _, key, _ in attacks:
        for group, grp in by_key[key].groupby(GROUP, sort=False):
            strongest[group] = min(strongest.get(group, (math.inf, "")), (grp["value"].mean(), key[1]))
    kinds = list(vocab.NOISE_KINDS)
    settings = values.drop_duplicates(GROUP).assign(
        _k=lambda f: f["noise_kind"].map(lambda k: kinds.index(k) if k in kinds else len(kinds))
    )
    settings = settings.sort_values(["dataset", "model", "_k", "noise_rate", "noise_setting"])
    for group in zip(*(settings[c] for c in GROUP), strict=True):
        for row in rows:
            question, _, key, _ = row
            if key[3] == "memorisation_rate" and group[2] == "none":
                continue
            if key[1] in vocab.ATTACKS and strongest.get(group, (0, ""))[1] != key[1]:
                continue
            sub = by_key[key]
            grp = sub[
                (sub["dataset"] == group[0]) & (sub["model"] == group[1]) & (sub["noise_setting"] == group[2])
            ]
            if len(grp):
                yield group, row, dict(zip(grp["regularizer"], grp["value"], strict=True))


def _index(comp: pd.DataFrame) -> dict[tuple, dict]:
    """Comparison rows by (dataset, model, setting, split, condition, severity, metric, regularizer,
    reference); severity NaN as NOSEV, as in the values."""
    comp = comp.assign(severity=comp["severity"].astype(float).fillna(NOSEV))
    cols = [*GROUP, *KEYS, "regularizer", "reference"]
    return {tuple(r[c] for c in cols): r for r in comp.to_dict("records")}


def _finding(
    head: tuple,
    a: str,
    b: str | None,
    levels: dict[str, float],
    comp: dict,
    p_column: str,
    harm: bool = False,
) -> Finding:
    """The Finding of a - b, from the comparison row (a vs b) or its mirror (b vs a) when present."""
    row, sign = comp.get((*head[:7], a, b)), 1.0
    if row is None and b is not None:
        row, sign = comp.get((*head[:7], b, a)), -1.0
    question, label, metric, better = head[7:]
    base = (
        *head[:3],
        question,
        label,
        metric,
        better,
        a,
        levels[a],
        b,
        levels.get(b, math.nan) if b else math.nan,
    )
    if row is None:
        return Finding(*base, math.nan, math.nan, math.nan, 0, math.nan, math.nan, harm=harm)
    lo, hi = sign * row["diff_ci_low"], sign * row["diff_ci_high"]
    above, below = (row["n_above"], row["n_below"])[:: int(sign)]
    verdict = row["verdict_pairs" if p_column == "p_adjusted_pairs" else "verdict"]
    if sign < 0:  # the row is b vs a: its direction words turn round
        verdict = FLIPPED.get(verdict, verdict)
    return Finding(*base, sign * row["diff"], min(lo, hi), max(lo, hi), int(row["n_pairs"]), row["p_value"],
                   row[p_column], int(above), int(below), verdict or "", harm=harm,
                   units_needed=float(row["units_needed"]))  # fmt: skip


def _with_verdicts(found: list[Finding]) -> list[Finding]:
    """A setting with one regularizer says so instead of a verdict."""
    for f in found:
        if f.b is None:
            f.verdict = "only one regularizer"
    return found


def findings(
    trials: pd.DataFrame,
    evals: pd.DataFrame,
    *,
    reference: str = "ce",
    alpha: float = 0.05,
    margins: dict[str, float] | None = None,
) -> list[Finding]:
    """Per setting and question the best regularizer vs the reference (vs the runner-up when the
    reference is best), then per setting its largest significant harm vs the reference (in points for
    [0, 1] metrics) unless a line above already is that comparison."""
    values = per_seed(trials, evals)
    if values.empty:
        return []
    comp = compare(values, reference=reference, alpha=alpha, margins=margins)
    index = _index(comp)
    out: list[Finding] = []
    harms: dict[tuple, tuple[float, Finding]] = {}
    for group, (question, label, key, better), levels in _answered(values):
        head = (*group, *key, question, label, key[3], better)
        ranked = sorted(levels, key=lambda r: -better * levels[r])
        best, others = ranked[0], ranked[1:]
        other = reference if best != reference and reference in levels else (others[0] if others else None)
        out.append(_finding(head, best, other, levels, index, "p_adjusted"))
        for reg in ranked:  # the reference's line is best vs reference, or reference vs runner-up
            if reg == reference:
                continue
            row = index.get((*head[:7], reg, reference))
            if reg == other or row is None or row["verdict"] not in DIFFERENT or row["diff"] * better >= 0:
                continue
            size = abs(row["diff"]) * scale(key[3])
            if size > harms.get(group, (0.0, None))[0]:
                harms[group] = (size, _finding(head, reg, reference, levels, index, "p_adjusted", harm=True))
    for group, (_, harm) in harms.items():
        last = max(i for i, f in enumerate(out) if f.group == group)
        out.insert(last + 1, harm)
    return _strength_gaps(_with_verdicts(out), trials)


def pair_findings(
    trials: pd.DataFrame,
    evals: pd.DataFrame,
    *,
    pair: tuple[str, str] | None = None,
    alpha: float = 0.05,
    margins: dict[str, float] | None = None,
) -> list[Finding]:
    """Every pair of regularizers (the better mean first) per setting and question, or only ``pair``
    (a, b) in that order at every setting that has both; p adjusted by Holm over the unordered pairs."""
    if pair is not None and "@" not in "".join(pair) and has_matched(trials):
        regs = set(trials["regularizer"].dropna())
        if not set(pair) <= regs:  # two names run at matched strengths: contrast them at each value
            return matched_findings(trials, evals, pair=pair, alpha=alpha, margins=margins)
    values = per_seed(trials, evals)
    if values.empty:
        return []
    values = _key_values(values)
    index = _index(compare(values, reference=None, alpha=alpha, margins=margins))
    out = []
    for group, (question, label, key, better), levels in _answered(values):
        head = (*group, *key, question, label, key[3], better)
        todo = _pairs(levels, better, pair, {r: r for r in levels})
        out += [_finding(head, a, b, levels, index, "p_adjusted_pairs") for a, b in todo]
    return _strength_gaps(_with_verdicts(out), trials)


def arm_parts(regularizer: str) -> tuple[str, str]:
    """ "label_smoothing@alpha=0.1" -> ("label_smoothing", "alpha=0.1"); a plain name -> (name, "")."""
    base, _, variant = regularizer.partition("@")
    return base, variant


def matched_findings(
    trials: pd.DataFrame,
    evals: pd.DataFrame,
    *,
    pair: tuple[str, str] | None = None,
    alpha: float = 0.05,
    margins: dict[str, float] | None = None,
) -> list[Finding]:
    """Regularizers at matched strengths (``alpha: {each: [...]}``): at each matched value, every pair of
    regularizers run at it (the better mean first), or only ``pair`` (two regularizer names without a
    value) in that order; per setting and question, the values in increasing order. Holm runs over the
    pairs at one value, setting and question."""
    values = per_seed(trials, evals)
    if values.empty:
        return []
    values = values.assign(_variant=[arm_parts(r)[1] for r in values["regularizer"]])
    values = _key_values(values[values["_variant"] != ""])
    out: list[tuple[tuple, Finding]] = []
    for variant, sub in values.groupby("_variant", sort=False):
        sub = sub.drop(columns="_variant")
        index = _index(compare(sub, reference=None, alpha=alpha, margins=margins))
        for rank, (group, (question, label, key, better), levels) in enumerate(_answered(sub)):
            head = (*group, *key, question, label, key[3], better)
            todo = _pairs(levels, better, pair, {arm_parts(r)[0]: r for r in levels})
            number = float(variant.split("=")[-1]) if variant.count("=") == 1 else 0.0
            for a, b in todo:
                found = _finding(head, a, b, levels, index, "p_adjusted_pairs")
                out.append(((group, label, number, variant, rank), found))
    # Settings in report order; within one, each question's lines in report order, at every value.
    order = {g: i for i, g in enumerate(dict.fromkeys(f.group for _, f in out))}
    first: dict[tuple, int] = {}
    for (group, label, _, _, rank), _ in out:
        first[(group, label)] = min(first.get((group, label), rank), rank)
    out.sort(key=lambda kf: (order[kf[1].group], first[(kf[0][0], kf[0][1])], kf[0][2], kf[0][3]))
    return _with_verdicts([f for _, f in out])


def _key_values(values: pd.DataFrame) -> pd.DataFrame:
    """The values of the findings' key rows only: the pairs' Holm families are per key row."""
    keys = pd.DataFrame([k for _, _, k, _ in _key_rows(values)], columns=KEYS)
    return values.merge(keys, on=KEYS)


def _pairs(
    levels: dict[str, float], better: int, pair: tuple[str, str] | None, named: dict[str, str]
) -> list[tuple[str, str]]:
    """The (a, b) lines of one setting and question: ``pair`` in its order when both of its names are in
    ``named`` (name -> regularizer of the setting), else every pair, the better mean first."""
    if pair is not None:
        return [(named[pair[0]], named[pair[1]])] if set(pair) <= set(named) else []
    ranked = sorted(levels, key=lambda r: -better * levels[r])
    return list(itertools.combinations(ranked, 2))


def has_matched(trials: pd.DataFrame) -> bool:
    """Whether the study ran regularizers at matched strengths (arms named ``name@param=value``)."""
    return bool(trials["regularizer"].dropna().str.contains("@", regex=False).any())


def _strength_gaps(found: list[Finding], trials: pd.DataFrame) -> list[Finding]:
    """Marks the findings whose two sides ran at strengths more than 2x apart (a contrast of
    strength as much as of method)."""
    strengths = chosen_strengths(trials)
    for f in found:
        sa, sb = strengths.get((*f.group, f.a)), strengths.get((*f.group, f.b or ""))
        if sa is not None and sb is not None and max(sa, sb) > 2 * min(sa, sb):
            f.strength_ratio = max(sa, sb) / min(sa, sb)
    return found
