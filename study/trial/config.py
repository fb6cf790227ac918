"""The one typed config of a trial, composed of the spec's own models.

Built in one place per caller: ``Cell.trial_config`` (study/sweep/cells.py) for the sweep, and
``study trial`` (study/cli/trial.py) from its options with the spec's defaults. The Ray trainable
and the post phase turn the stored dict back into this model on their first line.
"""

from __future__ import annotations

import numbers
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from study.spec import METRICS, DatasetSpec, EvaluateSpec, ModelSpec, NoiseSetting, TrainSpec


class RegularizerSetting(BaseModel):
    """A regularizer and its concrete parameter values (numbers, or ``{start, end, schedule}`` ramps)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "ce"
    params: dict[str, Any] = Field(default_factory=dict)


class TrialConfig(BaseModel):
    """Everything one trial needs.

    ``evaluate`` None means a search trial (validation metrics only); a final trial carries the spec's
    ``evaluate:`` block and runs the full evaluation on the clean test set.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(name="cnn1d"))
    regularizer: RegularizerSetting = Field(default_factory=RegularizerSetting)
    noise: NoiseSetting = Field(default_factory=NoiseSetting)
    noise_seed: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)
    train: TrainSpec = Field(default_factory=TrainSpec)
    metric: str = "val_accuracy"
    evaluate: EvaluateSpec | None = None
    checkpoint_dir: str | None = None
    save_model: bool = False

    @model_validator(mode="after")
    def _concrete(self) -> TrialConfig:
        for name in TrainSpec.SEARCHABLE:
            value = getattr(self.train, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"train.{name} of a trial must be a number, but got {value!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, but got {self.metric!r}")
        return self

    @property
    def lr(self) -> float:
        return float(self.train.lr)  # type: ignore[arg-type]

    @property
    def weight_decay(self) -> float:
        return float(self.train.weight_decay)  # type: ignore[arg-type]

    @property
    def full_eval(self) -> bool:
        return self.evaluate is not None
