"""The report as markdown (GitHub pipe tables) or LaTeX (booktabs): the same header, findings and
table model as the terminal report (reports/render.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from reports.build import Study
from reports.render import REFERENCE, Value, _fmt, answer_lines, build_tables, header_lines


def _text_cell(c: Value | str | None, fmt: str) -> str:
    if c is None:
        return "-"
    if isinstance(c, str):
        return c.replace("%", r"\%") if fmt == "latex" else c
    pm, bold = (r"$\pm$", r"\textbf{%s}") if fmt == "latex" else ("±", "**%s**")
    s = bold % _fmt(c.mean) if c.best else _fmt(c.mean)
    if np.isfinite(c.half):
        s += f" {pm} {_fmt(c.half)}"
    if c.is_ref:
        s += " (ref)"
    elif np.isfinite(c.delta):
        stars = (f"$^{{{c.stars}}}$" if fmt == "latex" else c.stars.replace("*", r"\*")) if c.stars else ""
        s += f" ({c.delta:+.3f}{stars})"
    return s


def render_markdown(
    study: Study, summary: pd.DataFrame | None = None, *, full: bool = True, reference: str = REFERENCE
) -> str:
    """The report as GitHub markdown: a header paragraph, the findings, then (``full``) one pipe table
    per table."""
    out = [f"# {study.name}", ""] + [f"{line}  " for line in header_lines(study, tables=full)] + [""]
    for kind, text in answer_lines(study, reference):
        if kind == "title":
            out += [f"## {text}", ""]
        else:  # setting lines in bold: "### " headings belong to the tables
            out.append(f"**{text.strip()}**  " if kind == "group" else f"{text.strip()}  ")
    out.append("")
    question = None
    for t in build_tables(study, summary) if full else []:
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


def _tex(s: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
        ("Σ", r"$\Sigma$"),
    ):
        s = s.replace(a, b)
    return s.replace("²", "$^2$")


def render_latex(
    study: Study, summary: pd.DataFrame | None = None, *, full: bool = True, reference: str = REFERENCE
) -> str:
    """The report as LaTeX: the findings as an itemize, then (``full``) booktabs tabulars."""
    out = [f"% {line}" for line in header_lines(study, tables=full)]
    items = [(k, t) for k, t in answer_lines(study, reference) if k in ("group", "line", "warning")]
    if items:
        out.append(r"\begin{itemize}")
        for kind, text in items:
            body = _tex(text.strip())
            out.append(r"\item " + (r"\textbf{" + body + "}" if kind == "group" else body))
        out.append(r"\end{itemize}")
    for t in build_tables(study, summary) if full else []:
        out += [r"\begin{table}[ht]", r"\centering", rf"\caption{{{_tex(t.question)}: {_tex(t.title)}}}"]
        out += [r"\begin{tabular}{l" + "r" * len(t.columns) + "}", r"\toprule"]
        out.append(" & ".join(_tex(x) for x in [t.first, *t.columns]) + r" \\")
        out.append(r"\midrule")
        for label, cells in t.rows:
            out.append(" & ".join([_tex(label), *(_text_cell(c, "latex") for c in cells)]) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)
