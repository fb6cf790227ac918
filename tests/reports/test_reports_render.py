"""reports.render: 80-column rich output, markdown/LaTeX tables, partial flag."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console
from scipy import stats as sps

from reports.build import build_summary, load_study, write_table
from reports.export import render_latex, render_markdown
from reports.render import Options, abbreviate, build_tables, render_rich
from reports.synthetic import make_synthetic_study
from study import vocabulary as vocab

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


def _rich_text(study, width: int) -> str:
    """The terminal report as plain text at `width` columns."""
    console = Console(width=width, record=True, file=io.StringIO())
    render_rich(study, console)
    return console.export_text()


@pytest.mark.parametrize("width", [80, 60])
def test_rich_fits_terminal(wide_study, width):
    text = _rich_text(wide_study, width)
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
    # One tabular per table, plus the findings table.
    assert tex.count(r"\begin{tabular}") == md.count("### ") + 1 and r"label\_smoothing" in tex


def test_abbreviate():
    assert abbreviate("adversarial-confident:0.2") == "adv-conf 0.2"
    assert abbreviate("none") == "none" and abbreviate("symmetric:0.4") == "sym 0.4"


CORRUPTED = ("gaussian_noise", "shot_noise", "impulse_noise")


@pytest.fixture(scope="module")
def corruption_study(tmp_path_factory):
    """Synthetic study whose per-corruption accuracies are replaced by known random values."""
    out = tmp_path_factory.mktemp("corr")
    frames = make_synthetic_study(
        out, models=("mlp",), noise_settings=("none", "symmetric:0.4"), corruptions=3
    )
    ev = frames["evals"].copy()
    is_c = ev["condition"].isin(CORRUPTED)
    rng = np.random.default_rng(1)
    # Per-corruption offsets so the columns differ, per-row noise so seeds and severities differ.
    offset = ev.loc[is_c, "condition"].map({c: 0.1 * i for i, c in enumerate(CORRUPTED)})
    ev.loc[is_c, "value"] = 0.5 + offset + rng.normal(0, 0.03, is_c.sum())
    # One clear effect, so that the significance marks are exercised too: maxsup resists shot noise.
    reg = ev["trial_id"].map(frames["trials"].set_index("trial_id")["regularizer"])
    ev.loc[(reg == "maxsup") & (ev["condition"] == "shot_noise"), "value"] += 0.15
    write_table(out, "evals", ev)
    study = load_study(out)
    study.summary = build_summary(out, write=False)
    return study


def _holm(p: dict) -> dict:
    """Holm step-down by hand: ascending p, multiplier m - k, running max, capped at 1."""
    order = sorted(p, key=p.get)
    adj, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * p[key]))
        adj[key] = running
    return adj


def _expected_cells(per_seed, column: str, reference: str = "ce", lower: bool = False) -> dict:
    """Markdown cells per (noise setting, regularizer) and value of ``column``, from per-seed values
    (index noise_setting, regularizer, column, seed): mean ± t-CI in %, the paired difference to the
    reference in points, its marks from scipy's paired t-test + Holm over the regularizers vs it."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for (ns, col), s in per_seed.groupby(level=["noise_setting", column]):
        by_reg = {reg: v.droplevel([0, 1, 2]).sort_index() for reg, v in s.groupby(level="regularizer")}
        ref = by_reg[reference]
        adj = _holm(
            {r: sps.ttest_rel(v.values, ref.values).pvalue for r, v in by_reg.items() if r != reference}
        )
        best = (min if lower else max)(by_reg, key=lambda r: by_reg[r].mean())
        for reg, v in by_reg.items():  # [0, 1] metrics in %, differences in points
            half = sps.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
            mean = f"**{100 * v.mean():.1f}**" if reg == best else f"{100 * v.mean():.1f}"
            if reg == reference:
                cell = f"{mean} ± {100 * half:.1f} (ref)"
            else:
                stars = "\\*\\*" if adj[reg] < 0.01 else "\\*" if adj[reg] < 0.05 else ""
                cell = f"{mean} ± {100 * half:.1f} ({100 * (v - ref).mean() + 0.0:+.1f}{stars})"
            out.setdefault((ns, reg), {})[col] = cell
    return out


def _expected_corruption_rows(study) -> dict[tuple[str, str], dict[str, str]]:
    """Per-corruption cells from the raw rows: mean over severities per seed, then as _expected_cells."""
    ev = study.evals.merge(study.trials[study.trials.phase == "final"], on="trial_id")
    ev = ev[ev.condition.isin(CORRUPTED)]
    return _expected_cells(
        ev.groupby(["noise_setting", "regularizer", "condition", "seed"])["value"].mean(), "condition"
    )


@pytest.mark.parametrize("reference", ["label_smoothing", "maxsup"])
@pytest.mark.parametrize("metric", ["accuracy", "ece"])
def test_reference_tables_and_marks_equal_the_paired_tests_against_it(wide_study, reference, metric):
    md = render_markdown(wide_study, Options(reference=reference))
    final = wide_study.trials[wide_study.trials.phase == "final"][
        ["trial_id", "noise_setting", "regularizer", "seed"]
    ]
    ev = wide_study.evals.merge(final, on="trial_id")
    ev = ev[(ev.metric == metric) & (ev.condition == "clean") & (ev.split == "test") & ev.severity.isna()]
    per_seed = ev.groupby(["noise_setting", "regularizer", "metric", "seed"])["value"].mean()
    expected = _expected_cells(per_seed, "metric", reference, lower=metric == "ece")
    title = f"### mnist1d / mlp: {'ECE' if metric == 'ece' else 'accuracy'}"
    block = md.split(title + "\n", 1)[1].strip().split("\n\n", 1)[0].splitlines()
    settings = block[0].strip("| ").split(" | ")[1:]
    regs = [line.split(" | ")[0].strip("| ") for line in block[2:]]
    assert regs[0] == reference and len(regs) == 4  # the reference's row first
    for line in block[2:]:
        reg, *cells = line.strip("| ").split(" | ")
        assert cells == [expected[ns, reg][metric] for ns in settings], (reg, settings)
    assert f"paired difference to {vocab.short_name(reference)}" in md.split("## ", 1)[0]


def test_per_corruption_tables_match_the_raw_rows(corruption_study):
    md = render_markdown(corruption_study)
    assert "## Corruption robustness" in md
    expected = _expected_corruption_rows(corruption_study)
    for ns in ("none", "symmetric:0.4"):
        title = f"### mnist1d / mlp, noise {ns}: accuracy per corruption, mean over severities 1-5"
        block = md.split(title, 1)[1].split("###", 1)[0].strip().splitlines()
        assert block[0] == "| regularizer | " + " | ".join(CORRUPTED) + " |"
        for reg in ("ce", "label_smoothing", "maxsup"):
            row = next(line for line in block if line.startswith(f"| {reg} |"))
            assert row == f"| {reg} | " + " | ".join(expected[ns, reg][c] for c in CORRUPTED) + " |"
    shot = expected["none", "maxsup"]["shot_noise"]  # the planted effect: large and marked significant
    assert shot.startswith("**") and "(+1" in shot and shot.endswith("\\*)")
    # The per-severity rows and corruption_mean stay where they were; the section sits after Robustness.
    assert md.index("## Robustness") < md.index("## Corruption robustness") < md.index("## Feature geometry")


@pytest.mark.parametrize("width", [80, 60])
def test_per_corruption_tables_in_the_terminal(corruption_study, width):
    text = _rich_text(corruption_study, width)
    assert max(len(line) for line in text.splitlines()) <= width
    section = text.split("Corruption robustness", 1)[1].split("Feature geometry", 1)[0]
    for cells in _expected_corruption_rows(corruption_study).values():
        for cell in cells.values():
            # "0.612 ± 0.011 (+0.010)" in markdown is "0.612±0.011" over "+0.010" in the terminal.
            mean_ci = cell.replace("**", "").split(" (")[0].replace(" ± ", "±")
            assert mean_ci in section


def test_no_corruption_section_without_corruptions(tmp_path):
    make_synthetic_study(tmp_path, models=("mlp",), corruptions=0)
    study = load_study(tmp_path)
    assert not any(t.question == "Corruption robustness" for t in build_tables(study))
    text = _rich_text(study, 80)
    assert "Corruption robustness" not in text and "Corruption robustness" not in render_markdown(study)
    assert "Robustness" in text and "pgd_ce" in text  # the attack tables are still there


def test_manifest_notes_are_in_the_report_header(tmp_path):
    make_synthetic_study(tmp_path, models=("mlp",), corruptions=0)
    note = "mnist1d/mlp/focal/none: no search trial completed (6 pruned, 0 failed or diverged)"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "notes": [note]}))
    study = load_study(tmp_path)
    assert f"Note: {note}" in render_markdown(study)
    # Without notes, no such line.
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert "Note: " not in render_markdown(load_study(tmp_path))
