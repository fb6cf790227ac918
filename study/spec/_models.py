"""Pydantic models of the study spec: frozen, unknown keys are errors, no type coercion (``epochs: true``
is not 1), no NaN or infinity in any float field.

Every hyperparameter value in the spec is one
of: a number or string (fixed), ``{low, high[, log][, step][, int]}`` (searched range), ``{choices: [...]}``
(categorical), ``{grid: [...]}`` (categorical, enumerated exhaustively by the grid sampler) or, for a
regularizer's strength, ``{start, end[, schedule]}`` (a fixed schedule over training); ``_values`` defines
them. Training's lr and weight_decay take only numbers, at every value they can reach.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from study import noise as noise_lib
from study import regularizers
from study.optuna_kinds import PRUNERS, SAMPLERS
from study.spec._values import (
    FieldError,
    PackSize,
    ParamValue,
    Ramp,
    Strict,
    check_number,
    endpoints,
    resolve_pack_size,
)
from study.vocabulary import METRIC_BY_NAME, SEARCH_METRICS

# The search metrics and their directions (read by the trial layer and the sweep too).
METRICS = SEARCH_METRICS


class SpecError(ValueError):
    """A bad spec: one line naming the field path, the problem and (when known) the YAML line."""


def _one_of(value: str, allowed: Any, what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r} (allowed: {', '.join(allowed)})")
    return value


# A spec's name is a directory name (results/<name>, the --storage prefix): one path component.
NAME_MAX = 100
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class DatasetSpec(Strict):
    name: str = "mnist1d"
    root: str | None = None
    download: bool = False
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    clean_validation: bool = False
    options: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class NoiseSetting(Strict):
    """One noise setting of a cell (and of a trial): a kind at one rate, or given labels.

    ``human``: ``dataset_labels`` (cifar10n | cifar100n) and ``label_set`` (aggre, random1..3, worst |
    noisy_label); ``file``: ``path`` to one label per training sample. Those take no rate.
    """

    kind: str = "none"
    rate: float = 0.0
    mode: str | None = None
    dataset_labels: str | None = None
    label_set: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _check(self) -> NoiseSetting:
        noise_lib.validate_noise(self.kind, self.rate, **self.source)
        return self

    @property
    def source(self) -> dict[str, Any]:
        """Keyword arguments of ``validate_noise`` besides kind and rate."""
        return {"mode": self.mode, "dataset_labels": self.dataset_labels, "label_set": self.label_set,
                "path": self.path}  # fmt: skip

    @property
    def label(self) -> str:
        """``none``, ``symmetric:0.4``, ``adversarial-confident:0.2``, ``human-worst`` or ``file-<stem>``
        (the cell id's last part; ``noise.setting_label``)."""
        return noise_lib.setting_label(self.kind, self.rate, self.mode, self.label_set, self.path)


class NoiseSpec(Strict):
    """A ``noise:`` entry: a kind with a list of rates, or (kind human) a list of label sets."""

    kind: str = "none"
    rate: list[float] = Field(default_factory=lambda: [0.0], min_length=1)
    mode: str | None = None
    dataset_labels: str | None = None
    label_set: list[str] | None = None
    path: str | None = None

    def settings(self) -> list[NoiseSetting]:
        rates = [0.0] if self.kind == "none" else self.rate
        common = {"kind": self.kind, "mode": self.mode, "dataset_labels": self.dataset_labels,
                  "path": self.path}  # fmt: skip
        return [
            NoiseSetting(rate=float(r), label_set=ls, **common)
            for ls in (self.label_set or [None])
            for r in rates
        ]

    @field_validator("rate", "label_set", mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> Any:
        return v if v is None or isinstance(v, list) else [v]

    @model_validator(mode="after")
    def _check(self) -> NoiseSpec:
        for label_set in self.label_set or [None]:
            for r in self.rate:
                noise_lib.validate_noise(
                    self.kind, r, mode=self.mode, dataset_labels=self.dataset_labels, label_set=label_set,
                    path=self.path,
                )  # fmt: skip
        return self


class PrunerSpec(Strict):
    kind: str = "median"
    n_warmup_steps: int = Field(3, ge=0)
    n_startup_trials: int = Field(3, ge=0)
    percentile: float = Field(50.0, gt=0.0, lt=100.0)
    patience: int = Field(3, ge=0)
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)
    lower: float | None = None
    upper: float | None = None

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        return _one_of(v, PRUNERS.names(), "pruner")


class TrainSpec(Strict):
    """Training settings: the spec's ``train:`` block, and (with concrete lr / weight_decay) a trial's.

    A new training setting is one field here, read where fit.py uses it: cells, trial configs and
    ``study trial`` all carry this model whole.
    """

    # Settings a spec may search (a range, choices or grid instead of a number).
    SEARCHABLE: ClassVar[tuple[str, ...]] = ("lr", "weight_decay")

    epochs: int = Field(30, ge=1)
    # Defaults that train the embedded default well (MNIST-1D cnn1d, 30 epochs: 93.7% test accuracy;
    # lr 1e-3 at batch 128 reached 50.8%): `study trial` with no options uses exactly these.
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: ParamValue = 2e-2
    weight_decay: ParamValue = 0.0
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    # Fractions of the run: a milestone at 0 or 1 (or beyond) would never change the learning rate.
    milestones: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(default_factory=lambda: [0.3, 0.6, 0.8])
    gamma: float = Field(0.2, gt=0.0, le=1.0)
    warmup_epochs: int = Field(0, ge=0)
    augment: bool = True
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: Any) -> Any:
        return check_number(v, low=0.0, low_inclusive=False)

    @field_validator("weight_decay")
    @classmethod
    def _weight_decay(cls, v: Any) -> Any:
        return check_number(v, low=0.0, low_inclusive=True)


class SearchSpec(Strict):
    trials_per_cell: int = Field(8, ge=1)
    # Independent searches per cell, each with its own sampler seed, split and noise draw (shared by the
    # regularizers of a setting), its own best configuration and final seeds: the unit of comparison.
    replicas: int = Field(1, ge=1, le=64)
    sampler: str = "tpe"
    metric: str = "val_accuracy"
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    seed: int = Field(0, ge=0, le=2**31 - 1)  # numpy takes < 2**32; cells add up to 100000
    n_startup_trials: int = Field(4, ge=0)
    keep_checkpoints: bool = Field(
        False,
        description=(
            "Keep each search trial's checkpoint after the trial has ended (default: removed then; final "
            "trials' models are always kept). Not part of the spec hash: it changes no result."
        ),
    )

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        return _one_of(v, SAMPLERS.names(), "sampler")

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        return _one_of(v, METRICS, "metric")

    @property
    def direction(self) -> str:
        return METRICS[self.metric]


class AdaptiveSeeds(Strict):
    """Seeds added in rounds: every cell starts with `min`; after each round, a cell whose key
    comparison (test accuracy vs the reference cell of its group, paired by seed) is still undecided
    (95% CI straddles zero, 90% CI not inside +-margin) gets one more seed (and so does its
    reference), until decided or `max`."""

    min: int = Field(3, ge=2)
    max: int = Field(10, ge=2)
    until: Literal["decided"] = "decided"
    reference: str = "ce"

    @model_validator(mode="after")
    def _check(self) -> AdaptiveSeeds:
        if self.max < self.min:
            raise ValueError(f"max must be >= min, but got min={self.min}, max={self.max}")
        return self


class FinalSpec(Strict):
    seeds: Annotated[int, Field(ge=1)] | AdaptiveSeeds = 3
    epochs: int | None = Field(None, ge=1)

    @property
    def max_seeds(self) -> int:
        return self.seeds if isinstance(self.seeds, int) else self.seeds.max

    @property
    def first_seeds(self) -> int:
        return self.seeds if isinstance(self.seeds, int) else self.seeds.min


class EvaluateSpec(Strict):
    attacks: list[str] = Field(default_factory=list)
    eps: list[float] = Field(default_factory=list)
    pgd_steps: int = Field(10, ge=1)
    pgd_step_size: float | None = Field(
        None,
        gt=0,
        description=(
            "PGD step size (pgd_ce, pgd_dlr, transfer), in the same units as eps and converted the same "
            "way: [0, 1] pixel units for images (eps 8/255 with step 2/255), data-std units for "
            "standardised data such as MNIST-1D (scaled by the std like eps). Absolute, not a fraction of "
            "eps: one step for every eps in the list. None (default) uses eps / 4 for each eps."
        ),
    )
    corruptions: list[str] | Literal["all"] = Field(default_factory=list)
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], min_length=1)
    max_samples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> EvaluateSpec:
        from study.robustness import attacks as attacks_lib

        for a in self.attacks:
            attacks_lib.validate_attack(a)
        for e in self.eps:
            if e < 0:
                raise ValueError(f"eps must be >= 0, but got {e}")
        for s in self.severities:
            if not 1 <= s <= 5:
                raise ValueError(f"severity must be in 1..5, but got {s}")
        return self


class DistillSpec(Strict):
    student: str = "mlp"
    temperature: float = Field(4.0, gt=0)
    epochs: int | None = Field(None, ge=1)
    student_options: dict[str, Any] = Field(default_factory=dict)


class ResourcesSpec(Strict):
    # A trial runs on one node, so it can never take more than one machine has; above these bounds Ray
    # would keep it pending forever (what the local machine has is checked before a local run starts).
    cpus_per_trial: float = Field(1.0, ge=0.01, le=1024)  # Ray keeps 4 decimals: 1e-9 would be 0
    gpus_per_trial: float = Field(0.0, ge=0, le=16)
    # Trials of one cell trained together in one process as one batched model (study/trial/pack.py):
    # 1 = one trial per process; "auto" = the measured best for the model and device (pack_size).
    trials_per_process: PackSize = 1

    def pack_size(self, model: str, batch_size: int) -> int:
        """Members per pack of a cell with this model and batch size (the one place ``auto`` resolves)."""
        return resolve_pack_size(self.trials_per_process, model, batch_size, gpus=self.gpus_per_trial)

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        # Ray packs fractional GPUs only below one GPU; above, a trial takes whole devices.
        if v > 1 and v != int(v):
            raise ValueError(f"must be a fraction below 1 (packs trials) or a whole number, but got {v:g}")
        return v


class MlflowSpec(Strict):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<results dir>/mlflow.db
    experiment_name: str | None = None  # None: the study's name


class WandbSpec(Strict):
    project: str
    mode: Literal["online", "offline", "disabled"] = "offline"
    group: str | None = None  # None: the study's name
    entity: str | None = None


class TrackingSpec(Strict):
    """TensorBoard, MLflow, W&B (optional extras): one run per trial named ``cell/phase/#n``, packed or
    not, logged from the trial's record when it ends (study/sweep/trackers.py).

    Tracking changes no result: it is left out of the spec hash, so it can be switched on for --resume.
    """

    tensorboard: bool = False
    mlflow: MlflowSpec | None = None
    wandb: WandbSpec | None = None


class StudySpec(Strict):
    name: str
    # Every random source derives from it (derive_seed in study/trial/config.py): two seeds are two
    # independent replications of the whole study; 0 keeps the streams studies always used.
    seed: int = Field(0, ge=0, le=2**32 - 1)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    models: list[ModelSpec] = Field(min_length=1)
    regularizers: dict[str, dict[str, ParamValue]] = Field(min_length=1)
    noise: list[NoiseSpec] = Field(default_factory=lambda: [NoiseSpec()], min_length=1)
    noise_seed: int = 0
    train: TrainSpec = Field(default_factory=TrainSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    final: FinalSpec = Field(default_factory=FinalSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    distill: DistillSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_failures: int = Field(1, ge=0)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    # Equivalence margins per metric, in its units (0.01 = 1 point of accuracy): a comparison whose 90%
    # interval lies inside +-margin is "equivalent" (study/vocabulary.py has the defaults).
    margins: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(default_factory=dict)

    @field_validator("margins")
    @classmethod
    def _margins(cls, v: dict[str, float]) -> dict[str, float]:
        for metric in v:
            _one_of(metric, METRIC_BY_NAME, "metric")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v) or v in (".", "..") or len(v) > NAME_MAX:
            raise ValueError(
                f"must be 1-{NAME_MAX} letters, digits, '_', '-' or '.' and not '.' or '..' "
                f"(it names the results directory), but got {v[: NAME_MAX + 20]!r}"
            )
        return v

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("regularizers", mode="before")
    @classmethod
    def _regs(cls, v: Any) -> Any:
        if isinstance(v, list):
            return {name: {} for name in v}
        if isinstance(v, dict):
            return {k: (val or {}) for k, val in v.items()}
        return v

    @model_validator(mode="after")
    def _check_regularizers(self) -> StudySpec:
        for name, params in self.regularizers.items():
            try:
                info = regularizers.get_info(name)  # ValueError lists the known names
            except ValueError as exc:
                raise FieldError(("regularizers", name), str(exc).rstrip(".")) from None
            for pname, value in params.items():
                loc = ("regularizers", name, pname)
                if pname not in info.params:
                    allowed = ", ".join(info.params) or "none"
                    raise FieldError(loc, f"unknown parameter (allowed: {allowed})")
                # A ramp is checked whole too: only schedulable parameters take one.
                whole = [value.model_dump()] if isinstance(value, Ramp) else []
                for v in [*whole, *endpoints(value)]:
                    try:
                        regularizers.validate_params(name, {pname: v})
                    except ValueError as exc:
                        # "label_smoothing: alpha must be in [-10, 1), but got 2": the path says whose.
                        raise FieldError(loc, str(exc).split(": ", 1)[-1].rstrip(".")) from None
        return self
