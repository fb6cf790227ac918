"""The report as markdown (GitHub pipe tables) or LaTeX (booktabs): the same header, findings and
table model as the terminal report (reports/render.py); the findings as one table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from reports.answer import Section, table_rows
from reports.build import Study
from reports.render import Options, Value, build_tables, header_lines


def _text_cell(c: Value | str | None, fmt: str) -> str:
    if c is None:
        return "-"
    if isinstance(c, str):
        return tex(c) if fmt == "latex" else c
    pm, bold = (r"$\pm$", r"\textbf{%s}") if fmt == "latex" else ("±", "**%s**")
    s = bold % c.level(c.mean) if c.best else c.level(c.mean)
    if np.isfinite(c.half):
        s += f" {pm} {c.level(c.half)}"
    if c.is_ref:
        s += " (ref)"
    elif np.isfinite(c.delta):
        stars = (f"$^{{{c.stars}}}$" if fmt == "latex" else c.stars.replace("*", r"\*")) if c.stars else ""
        s += f" ({c.difference()}{stars})"
    return s


def _md(text: str) -> str:
    return text.replace("|", r"\|")


def _markdown_section(section: Section) -> list[str]:
    out = [f"## {section.title}", ""]
    head, rows = table_rows(section)
    if rows:
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    else:
        out.append("No completed final trials yet: nothing to compare.")
    out.append("")
    out += [f"{note}  " for note in section.notes] + [f"Warning: {w}  " for w in section.warnings]
    return [*out, ""]


def render_markdown(study: Study, options: Options = Options(), summary: pd.DataFrame | None = None) -> str:
    """The report as GitHub markdown: a header paragraph, the findings as a table, then (``options.full``)
    one pipe table per table."""
    header = header_lines(study, tables=options.full, reference=options.reference)
    out = [f"# {study.name}", "", *(f"{line}  " for line in header), ""]
    for section in options.sections(study):
        out += _markdown_section(section)
    question = None
    for t in build_tables(study, summary, reference=options.reference) if options.full else []:
        if t.question != question:
            question = t.question
            out += [f"## {question}", ""]
        out += [f"### {t.title}", "", "| " + " | ".join([t.first, *t.columns]) + " |"]
        out.append("|" + "---|" * (len(t.columns) + 1))
        out += [
            "| " + " | ".join([label, *(_text_cell(c, "md") for c in cells)]) + " |"
            for label, cells in t.rows
        ]
        out.append("")
    return "\n".join(out)


# LaTeX's special characters, and the non-ASCII ones the report prints, as text-mode LaTeX.
_TEX = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
        ">": r"\textgreater{}", "Σ": r"$\Sigma$", "²": r"$^2$", "±": r"$\pm$", "ε": r"$\varepsilon$",
        "α": r"$\alpha$", "β": r"$\beta$", "γ": r"$\gamma$", "λ": r"$\lambda$", "≥": r"$\geq$",
        "≤": r"$\leq$", "×": r"$\times$", "–": "--"}  # fmt: skip


def tex(s: str) -> str:
    """``s`` as LaTeX text: every special character escaped, Greek letters and symbols in math mode."""
    return "".join(_TEX.get(ch, ch) for ch in s)


def _latex_table(caption: str, head: list[str], rows: list[list[str]], align: str) -> list[str]:
    out = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{tex(caption)}}}"]
    out += [r"\begin{tabular}{" + align + "}", r"\toprule", " & ".join(tex(x) for x in head) + r" \\"]
    out.append(r"\midrule")
    out += [" & ".join(row) + r" \\" for row in rows]
    return [*out, r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]


def render_latex(study: Study, options: Options = Options(), summary: pd.DataFrame | None = None) -> str:
    """The report as LaTeX: the findings as a booktabs table (notes and warnings as comments), then
    (``options.full``) one booktabs tabular per table."""
    out = [f"% {line}" for line in header_lines(study, tables=options.full, reference=options.reference)]
    for section in options.sections(study):
        head, rows = table_rows(section)
        if rows:
            body = [[tex(c) for c in row] for row in rows]
            out += _latex_table(section.title, head, body, "ll" + "lrl" * 2 + "rrrl" + "r" * section.wins)
        out += [f"% {note}" for note in section.notes] + [f"% Warning: {w}" for w in section.warnings]
    for t in build_tables(study, summary, reference=options.reference) if options.full else []:
        rows = [[tex(label), *(_text_cell(c, "latex") for c in cells)] for label, cells in t.rows]
        out += _latex_table(
            f"{t.question}: {t.title}", [t.first, *t.columns], rows, "l" + "r" * len(t.columns)
        )
    return "\n".join(out)
