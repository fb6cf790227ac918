"""The findings section of a report, laid out once (``Section``) and written as terminal lines (80
columns), a markdown table or a LaTeX table: the default findings vs the reference, every pair
(``--all-pairs``) or one pair at every setting (``--compare A:B``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from reports.build import Study
from reports.caveats import load_spec_dict, realized_rates, warnings
from reports.configs import chosen_configs
from reports.findings import (
    Finding,
    findings,
    has_matched,
    level_text,
    matched_findings,
    pair_findings,
)
from study import vocabulary as vocab

VERDICTS_NOTE = "better/worse: Holm CI excludes 0; equivalent: 90% CI in ±margin; n≈k to decide"
HARM_LABELS = {"accuracy": "acc.", "corruption": "corr.", "memorised": "mem.", "distilled": "dist."}


@dataclass
class Section:
    """What the findings section says: a title, the findings in setting order, each setting's chosen
    configurations, realised noise rates, notes and warnings."""

    title: str
    found: list[Finding]
    configs: dict[tuple[str, str, str, str], str]
    realized: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    wins: bool = False  # show each line's seed wins (--compare)
    first: str | None = None  # the regularizer named first in a setting's configurations
    chosen_label: str = "chosen"  # "chosen (median)": the median of the search replicas' choices
    unit: str = "seeds"  # what a paired unit is: seeds, or search replicas

    @property
    def n(self) -> int:
        """The usual number of paired seeds (lines with another n show theirs)."""
        counts = Counter(f.n for f in self.found if f.b is not None and f.n)
        return counts.most_common(1)[0][0] if counts else 0

    def groups(self) -> list[tuple[tuple[str, str, str], list[Finding]]]:
        out: list[tuple[tuple[str, str, str], list[Finding]]] = []
        for f in self.found:
            if not out or out[-1][0] != f.group:
                out.append((f.group, []))
            out[-1][1].append(f)
        return out

    def heading(self, group: tuple[str, str, str]) -> str:
        rate = self.realized.get(group[2])
        shown = f" (realised {100 * rate:.1f}% flipped)" if rate and group[2] != "none" else ""
        return f"{group[0]} / {group[1]}, noise {group[2]}{shown}"

    def chosen(self, group: tuple[str, str, str], regs: list[str]) -> str:
        """ "CE lr 0.012; LS α 0.34 lr 0.011" for the regularizers of the setting's lines."""
        parts = [f"{vocab.short_name(r)} {self.configs.get((*group, r), '')}".strip() for r in regs]
        return "; ".join(parts)


def _regs(lines: list[Finding], first: str | None) -> list[str]:
    regs = sorted({r for f in lines for r in (f.a, f.b) if r})
    return ([first] if first in regs else []) + [r for r in regs if r != first]


def sections(
    study: Study, reference: str, *, all_pairs: bool = False, pair: tuple[str, str] | None = None
) -> list[Section]:
    """The findings sections a report prints: ``pair`` (``--compare A:B``) and/or every pair
    (``--all-pairs``), else the findings vs ``reference``."""
    out = [pairs_section(study, pair)] if pair is not None else []
    out += [pairs_section(study)] if all_pairs else []
    if out:
        return out
    matched = [matched_section(study)] if has_matched(study.trials) else []
    return [findings_section(study, reference), *matched]


def matched_section(study: Study) -> Section:
    """Every pair of regularizers at each matched strength (``alpha: {each: [...]}``)."""
    found = matched_findings(study.trials, study.evals, margins=study.margins)
    section = Section(
        "Matched strengths: each pair at each value, the better mean first", found,
        chosen_configs(study.trials), realized_rates(study.trials), chosen_label=_chosen_label(study),
    )  # fmt: skip
    section.notes = [
        _units(section.n, _replicated(study)),
        f"p: paired t-test, raw/Holm over the pairs at one value{_attacks(study)}.",
        VERDICTS_NOTE,
    ]
    return section


def design_line(study: Study) -> str:
    """ "Design: seed 0; search 4 trials/cell (tpe, median); 4 seeds/cell; packs of auto" from spec.yaml,
    the manifest and the trials (search trials as run, final seeds as completed); with search replicas
    "3 replicas x search 4 trials" and seeds per replica."""
    spec = load_spec_dict(study.path) or {}
    parts = [f"seed {spec.get('seed', study.manifest.get('seed', 0))}"]  # a study's seed defaults to 0
    t = study.trials
    unit = ["cell_id", "replica"] if "replica" in t.columns and t["replica"].nunique() > 1 else ["cell_id"]
    replicas = f"{t['replica'].nunique()} replicas x " if len(unit) > 1 else ""  # of search + final seeds
    search = t[t["phase"] == "search"].groupby(unit).size()
    how = [str(v) for v in _kinds(spec.get("search")) if v]
    if len(search):
        parts.append(f"{replicas}search {_span(search)} trials" + (f" ({', '.join(how)})" if how else ""))
    final = t[(t["phase"] == "final") & (t["status"] == "completed")].groupby(unit)["seed"].nunique()
    if len(final):
        seeds = f"{_span(final)} seed" + ("" if _span(final) == "1" else "s")
        parts[-1] += f" + {seeds}" if replicas and len(search) else ""
        parts += [] if replicas and len(search) else [f"{seeds}/cell"]
    pack = (spec.get("resources") or {}).get("trials_per_process", 1)
    packs = f"packs of {pack}" if pack not in (1, None) else "one trial per process"
    parts.append("auto packs" if pack == "auto" else packs)
    return "Design: " + "; ".join(parts)


def _kinds(search: object) -> list[object]:
    """The search's sampler and pruner as the spec names them."""
    if not isinstance(search, dict):
        return []
    pruner = search.get("pruner")
    pruner = pruner.get("kind") if isinstance(pruner, dict) else pruner
    return [search.get("sampler"), pruner]


def _span(counts: pd.Series) -> str:
    lo, hi = int(counts.min()), int(counts.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _units(n: int, replicated: bool = False) -> str:
    word = "replicas" if replicated else "seeds"
    seeds = f"n={n} {word}" if n else f"final {word}"
    return f"Levels: mean of {seeds}, % for [0, 1] metrics; A - B: points [95% CI]."


def _replicated(study: Study) -> bool:
    return "replica" in study.trials.columns and study.trials["replica"].nunique() > 1


def _chosen_label(study: Study) -> str:
    return "chosen (median)" if _replicated(study) else "chosen"


def _attacks(study: Study) -> str:
    ev = study.evals[study.evals["condition"].isin(vocab.ATTACKS) & (study.evals["metric"] == "accuracy")]
    return f"; attack: the strongest at ε {ev['severity'].max():g}" if len(ev) else ""


def findings_section(study: Study, reference: str) -> Section:
    ref = vocab.short_name(reference)
    found = findings(study.trials, study.evals, reference=reference, margins=study.margins)
    section = Section(
        f"Findings vs {ref}", found, chosen_configs(study.trials), realized_rates(study.trials), [],
        warnings(study.trials, study.evals, load_spec_dict(study.path)), first=reference,
        chosen_label=_chosen_label(study),
    )  # fmt: skip
    section.notes = [
        f"Best mean vs {ref} (runner-up if {ref} is best); harm: the largest significant loss.",
        _units(section.n, _replicated(study)),
        f"p: paired t-test raw/Holm (over all vs {ref}){_attacks(study)}.",
        VERDICTS_NOTE,
    ]
    return section


def pairs_section(study: Study, pair: tuple[str, str] | None = None) -> Section:
    found = pair_findings(study.trials, study.evals, pair=pair, margins=study.margins)
    names = None if pair is None else tuple(vocab.short_name(r) for r in pair)
    title = "Findings: every pair, the better mean first" if names is None else f"{names[0]} vs {names[1]}"
    section = Section(
        title, found, chosen_configs(study.trials), realized_rates(study.trials), [],
        warnings(study.trials, study.evals, load_spec_dict(study.path)), wins=pair is not None,
        first=pair[0] if pair else None, chosen_label=_chosen_label(study),
        unit="replicas" if _replicated(study) else "seeds",
    )  # fmt: skip
    section.notes = [
        _units(section.n, _replicated(study)),
        f"p: paired t-test, raw/Holm over the pairs of a setting and question{_attacks(study)}.",
        VERDICTS_NOTE,
    ]
    if names is not None:
        unit = "replicas" if _replicated(study) else "seeds"
        section.notes.append(f"k/n {unit}: the paired {unit} on which {names[0]} is better than {names[1]}.")
        missing = _missing_settings(study, pair)
        section.notes += [f"Not in both: {', '.join(missing)}"] if missing else []
    return section


def _missing_settings(study: Study, pair: tuple[str, str]) -> list[str]:
    t = study.trials[(study.trials["phase"] == "final") & (study.trials["status"] == "completed")]
    have = t.groupby(["dataset", "model", "noise_setting"])["regularizer"].agg(set)
    return [f"{d}/{m}/{ns}" for (d, m, ns), regs in have.items() if not set(pair) <= regs]


def _line(f: Finding, n: int, wins: bool, unit: str) -> str:
    return f.sentence(n=f.n != n, raw=wins, wins=wins, unit=unit)


def _label(f: Finding) -> str:
    return f"harm {HARM_LABELS.get(f.label, f.label)}" if f.harm else f.label


def terminal_lines(section: Section) -> list[tuple[str, str]]:
    """(kind, text) lines: "title", "group", "config", "line", "warning", "note"."""
    lines = [("title", section.title)]
    width = max((len(_label(f)) for f in section.found), default=0)
    n = section.n
    for group, found in section.groups():
        lines.append(("group", section.heading(group)))
        chosen = section.chosen(group, _regs(found, section.first))
        lines.append(("config", f"  {section.chosen_label}: {chosen}"))
        for f in found:
            lines.append(("line", f"  {_label(f):<{width}} {_line(f, n, section.wins, section.unit)}"))
    if not section.found:
        lines.append(("note", "  no completed final trials yet: nothing to compare"))
    lines += [("note", note) for note in section.notes]
    lines += [("warning", f"Warning: {w}") for w in section.warnings]
    return lines


def table_rows(section: Section) -> tuple[list[str], list[list[str]]]:
    """The findings as one table (markdown, LaTeX): a row per finding, each with its setting."""
    head = ["setting", "question", "A", "A level", "A config", "B", "B level", "B config", "A - B [95% CI]",
            "n", "p raw/adj", "verdict"]  # fmt: skip
    head += ["A better on"] if section.wins else []
    rows = []
    for f in section.found:
        group = f"{f.dataset} / {f.model}, {f.noise_setting}"
        question = f"harm: {f.label}" if f.harm else f.label
        side = [(r, f.a_level if r == f.a else f.b_level) for r in (f.a, f.b)]
        cells = [group, question]
        for reg, level in side:
            if reg is None:
                cells += ["-", "-", "-"]
                continue
            cells += [
                vocab.short_name(reg),
                level_text(f.metric, level),
                section.configs.get((*f.group, reg), ""),
            ]
        p = f.p_values().removeprefix("p=")
        cells += [f.difference() or "-", str(f.n) if f.b else "-", p or "-", f.verdict_text()]
        cells += [f"{f.wins}/{f.n} {section.unit}" if f.n else "-"] if section.wins else []
        rows.append(cells)
    return head, rows
