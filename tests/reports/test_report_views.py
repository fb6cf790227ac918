"""The report's findings views (--reference, --all-pairs, --compare A:B) read back from the markdown
table and checked against scipy and the raw rows; the real quickstart's findings on an 80x40 screen."""

from __future__ import annotations

import io
import itertools
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from scipy import stats as sps

from reports.build import load_study, write_table
from reports.export import render_latex, render_markdown
from reports.findings import diff_text, findings, p_text
from reports.render import Options, render_rich
from reports.synthetic import make_synthetic_study
from study import vocabulary as vocab

QUICKSTART = Path(__file__).parent / "data" / "quickstart"  # trials/evals of a real quickstart run
SETTINGS = ("none", "symmetric:0.2", "adversarial-confident:0.2")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("views")
    frames = make_synthetic_study(out, models=("mlp",), noise_settings=SETTINGS, seeds=5, search_trials=4)
    # The strongest attack differs by setting: pgd_ce is 5 points lower than the others on clean labels,
    # pgd_dlr elsewhere; and MaxSup costs 8 points of ECE on symmetric noise (a planted harm).
    ev, tr = frames["evals"].copy(), frames["trials"].set_index("trial_id")
    setting, reg = ev.trial_id.map(tr["noise_setting"]), ev.trial_id.map(tr["regularizer"])
    weak = np.where(setting == "none", "pgd_ce", "pgd_dlr")
    ev.loc[(ev.condition == weak) & (ev.severity == 0.1), "value"] -= 0.05
    ev.loc[(setting == "symmetric:0.2") & (reg == "maxsup") & ev.metric.isin(["ece"]), "value"] += 0.08
    write_table(out, "evals", ev)
    return load_study(out)


def _per_seed(study, metric: str, condition: str = "clean", severity: float | None = None):
    final = study.trials[study.trials.phase == "final"][["trial_id", "noise_setting", "regularizer", "seed"]]
    ev = study.evals.merge(final, on="trial_id")
    ev = ev[(ev.metric == metric) & (ev.condition == condition) & (ev.split == "test")]
    ev = ev[ev.severity.isna()] if severity is None else ev[ev.severity == severity]
    return ev.pivot_table(index=["noise_setting", "seed"], columns="regularizer", values="value")


def _findings_table(md: str) -> list[dict[str, str]]:
    """The rows of the findings table (the first pipe table after "## Findings" or "## X vs Y")."""
    lines = md.split("\n## ", 1)[1].split("\n\n", 2)[1].splitlines()
    head = [c.strip() for c in lines[0].strip("|").split(" | ")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split(" | ")), strict=True)) for ln in lines[2:]]


QUESTIONS = {"accuracy": ("accuracy", "clean", None), "ECE": ("ece", "clean", None)}


def test_all_pairs_lines_equal_scipy_and_holm_for_every_pair(study):
    rows = _findings_table(render_markdown(study, Options(all_pairs=True, full=False)))
    regs = sorted(study.trials.regularizer.unique())
    n_questions = len({r["question"] for r in rows})
    # 3 pairs per setting and question; one attack per setting; no memorisation on clean labels
    assert len(rows) == 3 * (len(SETTINGS) * (n_questions - 1) - 1)
    for question, (metric, condition, severity) in QUESTIONS.items():
        wide = _per_seed(study, metric, condition, severity)
        for ns in SETTINGS:
            x = wide.loc[ns]
            raw = {(a, b): sps.ttest_rel(x[a], x[b]).pvalue for a, b in itertools.combinations(regs, 2)}
            order = sorted(raw, key=raw.get)  # Holm over the 3 unordered pairs, by hand
            adj, running = {}, 0.0
            for i, key in enumerate(order):
                running = max(running, min(1.0, (len(order) - i) * raw[key]))
                adj[key] = running
            got = [r for r in rows if r["question"] == question and r["setting"].endswith(f", {ns}")]
            assert len(got) == 3
            for r in got:
                a, b = (next(g for g in regs if vocab.short_name(g) == r[k]) for k in ("A", "B"))
                key = tuple(sorted((a, b)))
                better = 1 if metric == "accuracy" else -1
                assert better * x[a].mean() >= better * x[b].mean()  # the better mean first
                d = (x[a] - x[b]).to_numpy()
                half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
                ci = f"{diff_text(metric, d.mean())} [{diff_text(metric, d.mean() - half)}, "
                assert r["A - B [95% CI]"] == ci + f"{diff_text(metric, d.mean() + half)}]"
                assert r["p raw/adj"] == f"{p_text(raw[key])}/{p_text(adj[key])}" and r["n"] == "5"
                if adj[key] < 0.05:  # Holm over the pairs decides a difference
                    assert r["verdict"] == ("better" if better * d.mean() > 0 else "worse")
                else:
                    assert r["verdict"].split(" ")[0] in ("equivalent", "undecided")
                assert (
                    r["A level"] == f"{100 * x[a].mean():.1f}%"
                    and r["B level"] == f"{100 * x[b].mean():.1f}%"
                )


def test_compare_covers_every_setting_with_levels_and_seed_wins(study):
    rows = _findings_table(render_markdown(study, Options(pair=("maxsup", "label_smoothing"), full=False)))
    assert {r["setting"].split(", ")[1] for r in rows} == set(SETTINGS)
    assert {(r["A"], r["B"]) for r in rows} == {("MaxSup", "LS")}
    questions = {r["question"] for r in rows}
    assert {"accuracy", "ECE", "corruption", "memorised", "R²"} <= questions
    for ns in SETTINGS:
        got = {r["question"]: r for r in rows if r["setting"].endswith(f", {ns}")}
        assert len(got) == len(questions) - 1 - (
            ns == "none"
        )  # one attack; memorisation needs flipped labels
        for question, (metric, condition, severity) in QUESTIONS.items():
            x = _per_seed(study, metric, condition, severity).loc[ns]
            d = (x["maxsup"] - x["label_smoothing"]).to_numpy()
            wins = int((d > 0).sum() if metric == "accuracy" else (d < 0).sum())
            assert got[question]["A better on"] == f"{wins}/5 seeds"
            assert got[question]["p raw/adj"].split("/")[0] == p_text(
                sps.ttest_rel(d, np.zeros_like(d)).pvalue
            )


def test_the_strongest_attack_is_the_lowest_accuracy_of_each_setting(study):
    found = findings(study.trials, study.evals)
    attacks = {
        f.noise_setting: f.label
        for f in found
        if f.question == vocab.Q_ROBUSTNESS and f.label != "corruption"
    }
    assert attacks == {"none": "pgd_ce", "symmetric:0.2": "pgd_dlr", "adversarial-confident:0.2": "pgd_dlr"}
    for ns, attack in attacks.items():  # the lowest mean accuracy over the regularizers, at eps 0.1
        means = {a: _per_seed(study, "accuracy", a, 0.1).loc[ns].to_numpy().mean() for a in vocab.ATTACKS[:3]}
        assert min(means, key=means.get) == attack


def test_findings_give_both_levels_the_chosen_config_and_the_largest_harm(study):
    found = findings(study.trials, study.evals)
    harms = [f for f in found if f.harm]
    harm = next(f for f in harms if f.noise_setting == "symmetric:0.2")
    assert (harm.a, harm.b, harm.metric, harm.verdict) == ("maxsup", "ce", "ece", "worse")
    x = _per_seed(study, "ece").loc["symmetric:0.2"]
    assert (harm.a_level, harm.b_level) == pytest.approx((x["maxsup"].mean(), x["ce"].mean()))
    assert harm.diff == pytest.approx((x["maxsup"] - x["ce"]).mean()) and harm.diff > 0
    # Every harm is a significant loss vs the reference, and the largest in points of its setting.
    for h in harms:
        same = [f for f in found if f.group == h.group and not f.harm]
        assert all(
            f.verdict != "significant" or f.b != "ce" or (f.diff * f.better) > -abs(h.diff) for f in same
        )
    md = render_markdown(study, Options(full=False))
    rows = _findings_table(md)
    row = next(r for r in rows if r["question"] == "harm: ECE" and r["setting"].endswith("symmetric:0.2"))
    best = study.trials[(study.trials.phase == "search") & (study.trials.status == "completed")]
    best = best[best.cell_id == "mnist1d-mlp-maxsup-symmetric:0.2"].sort_values("best_value").iloc[-1]
    assert row["A config"] == f"α {best['param_alpha']:.2g} lr {best['param_lr']:.2g}"
    assert row["A level"] == f"{100 * x['maxsup'].mean():.1f}%" and row["B"] == "CE"


def test_latex_is_escaped(study):
    tex = render_latex(study, Options(pair=("maxsup", "ce"), all_pairs=True))
    body = "\n".join(ln for ln in tex.splitlines() if not ln.startswith("%")).replace(" & ", " ")
    assert not re.search(r"[<>εα±²Σ]", body)
    assert not re.search(r"(?<!\\)[%_&#]", body)  # every special character escaped
    assert r"$\alpha$ 0." in body and r"pgd\_ce" in body and r"\textbf{" in body  # configs, labels, bold


def _screen(study_dir, width: int = 80) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO())
    render_rich(load_study(study_dir), console, Options(full=False))
    return console.export_text().splitlines()


def test_the_quickstart_findings_fit_an_80x40_screen(tmp_path):
    out = tmp_path / "quickstart"
    shutil.copytree(QUICKSTART, out)
    lines = _screen(out)
    assert len(lines) <= 40 and max(map(len, lines)) <= 80, "\n".join(lines)
    text = "\n".join(lines)
    assert "Design: seed 0; 4 replicas x search 3 trials (tpe, median) + 1 seed; auto packs" in text
    # LS's calibration cost on clean labels is the harm of that setting, in points with both levels,
    # and decided (worse) even though CE is the best on ECE there.
    assert re.search(r"harm ECE +LS \d+\.\d% vs CE \d+\.\d% \+\d+\.\d \[.*\] p=\S+ worse", text)
    assert text.count("  chosen (median): CE lr ") == 3 and "mean of n=4 replicas" in text
