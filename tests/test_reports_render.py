"""reports.render: 80-column rich output, markdown/LaTeX tables, partial flag."""

from __future__ import annotations

import pytest
from rich.console import Console

from reports.build import build_summary, load_study
from reports.render import abbreviate, build_tables, render_latex, render_markdown, render_rich
from reports.synthetic import make_synthetic_study

WIDE = (
    "none",
    "symmetric:0.2",
    "symmetric:0.4",
    "pairflip:0.45",
    "adversarial-confident:0.2",
    "instance:0.3",
)


@pytest.fixture(scope="module")
def wide_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("wide")
    regs = ("ce", "label_smoothing", "maxsup", "online_label_smoothing")
    make_synthetic_study(out, models=("mlp",), regularizers=regs, noise_settings=WIDE, status="running")
    study = load_study(out)
    study.summary = build_summary(out, write=False)
    return study


@pytest.mark.parametrize("width", [80, 60])
def test_rich_fits_terminal(wide_study, width):
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    render_rich(wide_study, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width
    assert "PARTIAL RESULTS" in text
    for question in (
        "Clean test accuracy",
        "Calibration",
        "Robustness",
        "Feature geometry",
        "Search economics",
    ):
        assert question in text
    assert "adv-conf 0.2" in text and "online_label_smoothing" in text


def test_tables_values_and_best(wide_study):
    tables = {t.title: t for t in build_tables(wide_study)}
    acc = tables["mnist1d / mlp: accuracy"]
    assert [r for r, _ in acc.rows][0] == "ce" and acc.columns == [*WIDE[:4], WIDE[5], WIDE[4]]
    s = wide_study.summary
    s = s[(s.metric == "accuracy") & (s.condition == "clean")]
    for j, ns in enumerate(acc.columns):
        col = {reg: cells[j] for reg, cells in acc.rows}
        best = s[s.noise_setting == ns].sort_values("mean").iloc[-1]
        assert col[best.regularizer].best and sum(c.best for c in col.values()) == 1
    ece = tables["mnist1d / mlp: ECE"]
    for j in range(len(ece.columns)):  # lower is better for ECE
        col = {reg: cells[j] for reg, cells in ece.rows}
        best = min(col, key=lambda r: col[r].mean)
        assert col[best].best
    econ = tables["mnist1d / mlp: search trials; epochs saved = Σ over pruned (max_epochs - epochs)"]
    tr = wide_study.trials
    for reg, cells in econ.rows:
        srch = tr[(tr.phase == "search") & (tr.regularizer == reg)]
        pruned = srch[srch.status == "pruned"]
        assert cells[0] == str(len(srch)) and cells[3] == str(int((pruned.max_epochs - pruned.epochs).sum()))


def test_markdown_and_latex(wide_study):
    md = render_markdown(wide_study)
    assert "PARTIAL RESULTS" in md and "## Calibration" in md and "### mnist1d / mlp: ECE" in md
    assert "| regularizer | none | symmetric:0.2 |" in md and "(ref)" in md and "**" in md
    row = next(line for line in md.splitlines() if line.startswith("| maxsup |"))
    assert row.count("|") == len(WIDE) + 2
    tex = render_latex(wide_study)
    assert tex.count(r"\begin{tabular}") == md.count("### ") and r"label\_smoothing" in tex


def test_abbreviate():
    assert abbreviate("adversarial-confident:0.2") == "adv-conf 0.2"
    assert abbreviate("none") == "none" and abbreviate("symmetric:0.4") == "sym 0.4"
