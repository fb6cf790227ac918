"""The Optuna samplers and pruners a spec can name: one registry each.

Below the spec layer so that ``study.spec`` validates names against the same entries that
``study.sweep.optuna_cells`` builds from. Builders import nothing at module level beyond optuna.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from study.registry import Registry


@dataclass(frozen=True)
class SamplerKind:
    """``build(search spec, per-cell seed, grid space or None) -> sampler``."""

    name: str
    build: Callable[[Any, int, dict[str, list[Any]] | None], optuna.samplers.BaseSampler]
    description: str


@dataclass(frozen=True)
class PrunerKind:
    """``build(pruner spec, max epochs) -> pruner``."""

    name: str
    build: Callable[[Any, int], optuna.pruners.BasePruner]
    description: str


SAMPLERS: Registry[SamplerKind] = Registry(
    "sampler",
    [
        SamplerKind(
            "tpe",
            lambda s, seed, _: optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials),
            "tree-structured Parzen estimator",
        ),
        SamplerKind("random", lambda s, seed, _: optuna.samplers.RandomSampler(seed=seed), "uniform random"),
        SamplerKind(
            "gp",
            lambda s, seed, _: optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.n_startup_trials),
            "Gaussian-process Bayesian optimisation",
        ),
        SamplerKind(
            "grid", lambda s, seed, space: optuna.samplers.GridSampler(space, seed=seed), "exhaustive grid"
        ),
    ],
)


def _median(p: Any, _: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)


PRUNERS: Registry[PrunerKind] = Registry(
    "pruner",
    [
        PrunerKind("median", _median, "below the median of earlier trials at the same epoch"),
        PrunerKind(
            "percentile",
            lambda p, _: optuna.pruners.PercentilePruner(
                p.percentile, n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
            ),
            "below a percentile of earlier trials",
        ),
        PrunerKind(
            "successive_halving",
            lambda p, _: optuna.pruners.SuccessiveHalvingPruner(
                min_resource=p.min_resource, reduction_factor=p.reduction_factor
            ),
            "asynchronous successive halving",
        ),
        PrunerKind(
            "hyperband",
            lambda p, epochs: optuna.pruners.HyperbandPruner(
                min_resource=p.min_resource, max_resource=epochs, reduction_factor=p.reduction_factor
            ),
            "Hyperband over successive-halving brackets",
        ),
        PrunerKind(
            "wilcoxon",
            lambda p, _: optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=p.n_warmup_steps),
            "Wilcoxon signed-rank test against the best trial",
        ),
        PrunerKind(
            "patient",
            lambda p, e: optuna.pruners.PatientPruner(_median(p, e), patience=p.patience),
            "median pruner that waits `patience` epochs without improvement",
        ),
        PrunerKind(
            "threshold",
            lambda p, _: optuna.pruners.ThresholdPruner(
                lower=p.lower, upper=p.upper, n_warmup_steps=p.n_warmup_steps
            ),
            "outside [lower, upper]",
        ),
        PrunerKind("none", lambda p, _: optuna.pruners.NopPruner(), "no pruning"),
    ],
)
