"""PNG figures of a study (matplotlib, Agg backend): one file per figure under ``plots/``.

Values over seeds are drawn as the seeds themselves (dots) over their mean (line) and 95% t-CI (bars,
only from 3 seeds: at n=2 the t quantile is 12.7 and the interval says nothing).

[0, 1] metrics are drawn in % (differences in points), as the report prints them. Panels that are
compared share their y axis; means are joined by a line only from 3 x values (two points make no trend).

- accuracy_vs_noise_<dataset>_<model>.png, ece_vs_noise_...: clean test accuracy / ECE vs noise rate,
  one panel per noise kind (rate 0 = the "none" setting; a kind without a rate, human labels or a label
  file, at its realised flip rate).
- forest_<dataset>_<model>.png: paired difference to the reference regularizer (ce) per seed, mean
  and CI, per (noise setting, regularizer), one panel per metric (accuracy, ECE, NLL).
- accuracy_vs_eps_...: accuracy under each attack vs eps (eps 0 = clean), rows: noise settings.
- accuracy_vs_severity_...: accuracy averaged over the corruptions vs severity (0 = clean).
- strength_...: validation value of the search trials vs each regularizer's own strength parameter,
  coloured by learning rate; completed trials filled, pruned trials hollow (their value is a
  partial-budget value); the chosen configuration ringed, its strength and lr written out.
- reliability_...: reliability diagram per (noise setting, regularizer), the evaluation's 15 bins and
  its confidence == 1.0 bin, pooled over seeds, with the share of samples per bin and the ECE.
- curves_...: validation accuracy vs epoch of every search trial, pruned trials red.
- projection_...: penultimate features on the plane of three class templates, one scale for all panels.
"""

from __future__ import annotations

import os
from pathlib import Path

from reports.build import Study
from reports.caveats import realized_rates
from reports.plots._calibration import bin_geometry, pooled_bins, reliability
from reports.plots._common import colors, per_seed, save, slug
from reports.plots._effects import forest, paired_differences, vs_eps, vs_noise, vs_severity
from reports.plots._search import curves, projections, strength
from reports.render import _order_regs, _order_settings
from reports.stats import REFERENCE


def write_plots(
    study: Study, plots_dir: str | os.PathLike | None = None, *, reference: str = REFERENCE
) -> list[Path]:
    """Write every figure for ``study``; returns the written paths (figures without data are skipped).

    Args:
        study: a loaded study.
        plots_dir: output folder (default ``study.path / "plots"``), created if missing.
        reference: the regularizer the forest plot compares every other one with.
    """
    out = Path(plots_dir) if plots_dir is not None else study.path / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    seeds = per_seed(study)
    realized = realized_rates(study.trials)
    for (dataset, model), tr in study.trials.groupby(["dataset", "model"], sort=True):
        regs = _order_regs(tr["regularizer"])
        if reference in regs:
            regs = [reference] + [r for r in regs if r != reference]
        cols, where, name = colors(regs), f"{dataset}/{model}", slug(dataset, model)
        settings = _order_settings(tr)
        ps = seeds[(seeds["dataset"] == dataset) & (seeds["model"] == model)]
        for metric in ("accuracy", "ece"):
            fig = vs_noise(ps, metric, regs, cols, where, realized)
            save(fig, out / f"{metric}_vs_noise_{name}.png", written)
        if reference in regs:
            fig = forest(ps, regs, cols, settings, where, reference)
            save(fig, out / f"forest_{name}.png", written)
        save(vs_eps(ps, regs, cols, settings, where), out / f"accuracy_vs_eps_{name}.png", written)
        save(vs_severity(ps, regs, cols, settings, where), out / f"accuracy_vs_severity_{name}.png", written)
        save(strength(tr, regs, cols, where), out / f"strength_{name}.png", written)
        save(reliability(ps, regs, settings, where), out / f"reliability_{name}.png", written)
        ep = study.epochs[study.epochs["trial_id"].isin(tr["trial_id"])]
        fig = curves(tr, ep, regs, settings, f"{where}: search trials (blue: completed, red: pruned)")
        save(fig, out / f"curves_{name}.png", written)
    projections(study, out, written)
    return written


__all__ = [
    "bin_geometry",
    "forest",
    "paired_differences",
    "per_seed",
    "pooled_bins",
    "reliability",
    "strength",
    "vs_eps",
    "vs_noise",
    "vs_severity",
    "write_plots",
]
