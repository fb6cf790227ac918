"""Pydantic models of the study spec, strict about unknown keys (frozen; unknown keys are errors).

Every hyperparameter value in the spec is one
of: a number or string (fixed), ``{low, high[, log][, step][, int]}`` (searched range), ``{choices: [...]}``
(categorical), ``{grid: [...]}`` (categorical, enumerated exhaustively by the grid sampler) or, for a
regularizer's strength, ``{start, end[, schedule]}`` (a fixed schedule over training).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from study import noise as noise_lib
from study import regularizers
from study.optuna_kinds import PRUNERS, SAMPLERS
from study.vocabulary import SEARCH_METRICS

# The search metrics and their directions (read by the trial layer and the sweep too).
METRICS = SEARCH_METRICS


class SpecError(ValueError):
    """A bad spec: one line naming the field path, the problem and (when known) the YAML line."""


def _one_of(value: str, allowed: Any, what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r} (allowed: {', '.join(allowed)})")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    low: float
    high: float
    log: bool = False
    step: float | None = None
    int: bool = False

    @model_validator(mode="after")
    def _check(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low must be <= high, but got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, but got low={self.low}")
        return self


class Choices(_Strict):
    choices: list[Any] = Field(min_length=1)


class Grid(_Strict):
    grid: list[Any] = Field(min_length=1)


class Ramp(_Strict):
    start: float
    end: float
    schedule: Literal["constant", "linear", "cosine"] = "linear"


ParamValue = float | int | str | bool | Range | Choices | Grid | Ramp


def _endpoints(value: Any) -> list[Any]:
    """The concrete values a spec value can take at its extremes (for range validation)."""
    if isinstance(value, Range):
        return [value.low, value.high]
    if isinstance(value, Choices):
        return list(value.choices)
    if isinstance(value, Grid):
        return list(value.grid)
    if isinstance(value, Ramp):
        return [value.start, value.end]
    return [value]


class DatasetSpec(_Strict):
    name: str = "mnist1d"
    root: str | None = None
    download: bool = False
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    clean_validation: bool = False
    options: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(_Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class NoiseSetting(_Strict):
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
        (the cell id's last part)."""
        if self.kind == "none":
            return "none"
        if not noise_lib.NOISE_REGISTRY[self.kind].uses_rate:
            return noise_lib.given_label(self.kind, self.label_set, self.path)
        kind = f"{self.kind}-{self.mode}" if self.mode else self.kind
        return f"{kind}:{self.rate:g}"


class NoiseSpec(_Strict):
    """A ``noise:`` entry: a kind with a list of rates, or (kind human) a list of label sets."""

    kind: str = "none"
    rate: list[float] = Field(default_factory=lambda: [0.0])
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


class PrunerSpec(_Strict):
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


class TrainSpec(_Strict):
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
    milestones: list[float] = Field(default_factory=lambda: [0.3, 0.6, 0.8])
    gamma: float = Field(0.2, gt=0.0, le=1.0)
    warmup_epochs: int = Field(0, ge=0)
    augment: bool = True
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class SearchSpec(_Strict):
    trials_per_cell: int = Field(8, ge=1)
    sampler: str = "tpe"
    metric: str = "val_accuracy"
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    seed: int = 0
    n_startup_trials: int = Field(4, ge=0)

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


class FinalSpec(_Strict):
    seeds: int = Field(3, ge=1)
    epochs: int | None = Field(None, ge=1)


class EvaluateSpec(_Strict):
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
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
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


class DistillSpec(_Strict):
    student: str = "mlp"
    temperature: float = Field(4.0, gt=0)
    epochs: int | None = Field(None, ge=1)
    student_options: dict[str, Any] = Field(default_factory=dict)


class ResourcesSpec(_Strict):
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        # Ray packs fractional GPUs only below one GPU; above, a trial takes whole devices.
        if v > 1 and v != int(v):
            raise ValueError(f"must be a fraction below 1 (packs trials) or a whole number, but got {v:g}")
        return v


class MlflowSpec(_Strict):
    tracking_uri: str | None = None  # None: MLflow's default ($MLFLOW_TRACKING_URI, else ./mlruns)
    experiment_name: str | None = None  # None: the study's name


class WandbSpec(_Strict):
    project: str
    mode: Literal["online", "offline", "disabled"] = "offline"
    group: str | None = None  # None: the study's name
    entity: str | None = None


class TrackingSpec(_Strict):
    """Ray Tune's own logger callbacks (optional extras); one run per trial named ``cell/phase/#n``.

    Tracking changes no result: it is left out of the spec hash, so it can be switched on for --resume.
    """

    tensorboard: bool = False
    mlflow: MlflowSpec | None = None
    wandb: WandbSpec | None = None


class StudySpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    models: list[ModelSpec] = Field(min_length=1)
    regularizers: dict[str, dict[str, ParamValue]] = Field(min_length=1)
    noise: list[NoiseSpec] = Field(default_factory=lambda: [NoiseSpec()])
    noise_seed: int = 0
    train: TrainSpec = Field(default_factory=TrainSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    final: FinalSpec = Field(default_factory=FinalSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    distill: DistillSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_failures: int = Field(1, ge=0)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

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
            info = regularizers.get_info(name)  # ValueError lists the known names
            for pname, value in params.items():
                if pname not in info.params:
                    allowed = ", ".join(info.params) or "none"
                    raise ValueError(f"{name}: unknown parameter {pname!r} (allowed: {allowed})")
                for v in _endpoints(value):
                    regularizers.validate_params(name, {pname: v})
        return self


# Fields added after results directories already existed, left out of the hash while unset so that
# those studies still resume (their hash was computed without them).
_NEW_NOISE_FIELDS = ("dataset_labels", "label_set", "path")


def spec_hash(spec: StudySpec) -> str:
    """Hash of the resolved spec (defaults filled in), stable across key order and formatting.

    ``tracking`` is not part of it (it changes where runs are logged, not what they compute).
    """
    dump = spec.model_dump(mode="json", exclude={"tracking"})
    for noise in dump["noise"]:
        for key in _NEW_NOISE_FIELDS:
            if noise.get(key) is None:
                noise.pop(key, None)
    blob = json.dumps(dump, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
