"""The one typed config of a trial, composed of the spec's own models.

Built in one place per caller: ``Cell.trial_config`` (study/sweep/cells.py) for the sweep, and
``study trial`` (study/cli/trial.py) from its options with the spec's defaults. The Ray trainable
and the post phase turn the stored dict back into this model on their first line.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from study.spec import METRICS, DatasetSpec, EvaluateSpec, ModelSpec, NoiseSetting, TrainSpec

# Random streams a study seed splits into (derive_seed): one per kind of randomness, so that no two
# sources share draws.
TRAIN_STREAM, DATA_STREAM, SAMPLER_STREAM = 1, 2, 3


def derive_seed(study_seed: int, stream: int, key: int, replica: int = 0) -> int:
    """The seed of one random source (`stream`, `key`: a trial's seed, noise seed, sampler seed) in the
    study replication `study_seed` and search replica `replica`. Study seed 0, replica 0 keeps `key`
    itself: the streams every study used before study seeds existed, so their results reproduce.
    Otherwise all four are hashed (numpy's SeedSequence)."""
    if study_seed == 0 and replica == 0:
        return key
    return int(np.random.SeedSequence([study_seed, stream, key, replica]).generate_state(1)[0])


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
    study_seed: int = Field(0, ge=0)
    replica: int = Field(0, ge=0)
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
    def train_seed(self) -> int:
        """Seeds the initial weights, the data order, the regularizer's and the attacks' randomness."""
        return derive_seed(self.study_seed, TRAIN_STREAM, self.seed, self.replica)

    @property
    def data_seed(self) -> int:
        """Seeds the label noise and the train/validation split (shared by every regularizer of a
        search replica)."""
        return derive_seed(self.study_seed, DATA_STREAM, self.noise_seed, self.replica)

    @property
    def lr(self) -> float:
        return float(self.train.lr)  # type: ignore[arg-type]

    @property
    def weight_decay(self) -> float:
        return float(self.train.weight_decay)  # type: ignore[arg-type]

    @property
    def full_eval(self) -> bool:
        return self.evaluate is not None
