"""Cells of a study (dataset x model x regularizer x noise setting) and the trial configs they make.

``Cell.trial_config`` is the one place where a spec, a cell, the sampled hyperparameters, a seed and a
phase become a ``TrialConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from study.spec import Choices, Each, Grid, ModelSpec, NoiseSetting, Ramp, Range, StudySpec, TrainSpec
from study.trial.config import RegularizerSetting, TrialConfig

Phase = Literal["search", "final"]


@dataclass(frozen=True)
class Cell:
    """One cell of the study: everything but the searched hyperparameters and the seed.

    ``cell_id`` (``dataset/model/regularizer/noise label``, then ``/r<k>`` for search replica k of a
    study with ``search.replicas`` > 1) is computed once, when the cell is made and names the cell's
    Optuna study, trials and checkpoints; ``base_id`` (no replica) is the ``cell_id`` of the tables,
    whose ``replica`` column tells replicas apart. ``cell.reference("ce")`` is the ce cell of the same
    data, model, noise and replica (ids included).
    """

    dataset: str
    model: str
    model_options: dict[str, Any]
    regularizer: str
    noise: NoiseSetting
    space: dict[str, Any] = field(default_factory=dict)  # hyperparameter name -> spec value
    replica: int | None = None  # None: the study has one search per cell
    # "alpha=0.1" for a strength fixed by `{each: [...]}`: the cell is the regularizer at that strength
    variant: str | None = None
    cell_id: str = field(init=False)
    base_id: str = field(init=False)

    def __post_init__(self) -> None:
        base = f"{self.dataset}/{self.model}/{self.arm}/{self.noise.label}"
        object.__setattr__(self, "base_id", base)
        object.__setattr__(self, "cell_id", base if self.replica is None else f"{base}/r{self.replica}")

    @property
    def arm(self) -> str:
        """What the tables call the cell's regularizer: its name, at a matched strength name@variant."""
        return self.regularizer if self.variant is None else f"{self.regularizer}@{self.variant}"

    def reference(self, regularizer: str) -> Cell:
        """The cell of `regularizer` (at its searched strength) with this cell's data, model, noise and
        replica: ``cell.reference("ce")`` is the ce cell post-phase transfers and comparisons use."""
        return replace(self, regularizer=regularizer, variant=None)

    @property
    def searched(self) -> dict[str, Any]:
        return {k: v for k, v in self.space.items() if isinstance(v, (Range, Choices, Grid))}

    @property
    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self.space.items() if not isinstance(v, (Range, Choices, Grid))}

    def trial_config(
        self,
        spec: StudySpec,
        params: dict[str, Any],
        *,
        seed: int,
        phase: Phase,
        checkpoint_dir: str | None = None,
    ) -> TrialConfig:
        """The config of one trial of this cell: fixed values, then the sampled `params` over them.

        Search trials train on the spec's noise seed and stop at validation; final trials re-draw the
        noise with ``noise_seed + seed`` (shared by every regularizer at that seed, so comparisons stay
        paired), train ``final.epochs`` when set, run the full evaluation and keep their model.
        """
        values = {**self.fixed, **params}
        final = phase == "final"
        train_values = {k: values[k] for k in TrainSpec.SEARCHABLE if k in values}
        if final and spec.final.epochs:
            train_values["epochs"] = spec.final.epochs
        return TrialConfig(
            dataset=spec.dataset,
            model=ModelSpec(name=self.model, options=dict(self.model_options)),
            regularizer=RegularizerSetting(
                name=self.regularizer,
                params={k: v for k, v in values.items() if k not in TrainSpec.SEARCHABLE},
            ),
            noise=self.noise,
            noise_seed=spec.noise_seed + (seed if final else 0),
            seed=seed,
            study_seed=spec.seed,
            replica=self.replica or 0,
            train=spec.train.model_copy(update=train_values),
            metric=spec.search.metric,
            evaluate=spec.evaluate if final else None,
            checkpoint_dir=checkpoint_dir,
            save_model=final,
        )


def expand_cells(spec: StudySpec) -> list[Cell]:
    """Every cell of the spec, in a deterministic order (model, regularizer, noise setting, replica).

    Raises ValueError on two cells with one id (``study validate`` refuses such a spec first, naming
    the field: ``check_unique_cells``).
    """
    train_space = {name: getattr(spec.train, name) for name in TrainSpec.SEARCHABLE}
    settings = [setting for noise_spec in spec.noise for setting in noise_spec.settings()]
    replicas: list[int | None] = list(range(spec.search.replicas)) if spec.search.replicas > 1 else [None]
    cells = []
    for model in spec.models:
        for reg, params in spec.regularizers.items():
            space = {
                **train_space,
                **{k: (v.model_dump() if isinstance(v, Ramp) else v) for k, v in params.items()},
            }
            for variant, values in _matched_strengths(params):
                for setting in settings:
                    for replica in replicas:
                        cell = Cell(
                            spec.dataset.name, model.name, dict(model.options), reg, setting,
                            {**space, **values}, replica, variant,
                        )  # fmt: skip
                        cells.append(cell)
    ids = [c.cell_id for c in cells]
    if len(set(ids)) < len(ids):
        raise ValueError(f"two cells share the id {next(i for i in ids if ids.count(i) > 1)!r}")
    return cells


def _matched_strengths(params: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """(variant, fixed values) per combination of a regularizer's `{each: [...]}` parameters; one
    (None, {}) when it has none."""
    each = {k: v.each for k, v in params.items() if isinstance(v, Each)}
    if not each:
        return [(None, {})]
    combos = [{}]
    for name, values in each.items():
        combos = [{**c, name: v} for c in combos for v in values]
    return [(",".join(f"{k}={float(v)!r}" for k, v in c.items()), c) for c in combos]


def grid_size(cell: Cell) -> int:
    """Number of points of a cell's grid (product over its Grid/Choices values); 0 if it has a range."""
    n = 1
    for v in cell.searched.values():
        if isinstance(v, Range):
            return 0
        n *= len(v.grid if isinstance(v, Grid) else v.choices)
    return n


def search_budget(spec: StudySpec, cell: Cell) -> int:
    """Search trials of a cell: trials_per_cell, capped by the grid's size under the grid sampler; 0 for
    every cell when the spec searches nothing (its final trials then start at once)."""
    if not _searches_anything(spec):
        return 0
    if spec.search.sampler == "grid":
        return min(spec.search.trials_per_cell, max(grid_size(cell), 1))
    return spec.search.trials_per_cell


def planned_counts(spec: StudySpec, cells: list[Cell]) -> dict[str, int]:
    # With adaptive seeds the final count is an upper bound (every cell at its maximum).
    return {"search": sum(search_budget(spec, c) for c in cells), "final": len(cells) * spec.final.max_seeds}


def _searches_anything(spec: StudySpec) -> bool:
    values = [getattr(spec.train, k) for k in TrainSpec.SEARCHABLE]
    values += [v for params in spec.regularizers.values() for v in params.values()]
    return any(isinstance(v, (Range, Choices, Grid)) for v in values)
