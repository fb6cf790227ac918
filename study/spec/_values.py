"""Hyperparameter values of a spec: a fixed value, ``{low, high[, log][, step][, int]}`` (searched range),
``{choices: [...]}``, ``{grid: [...]}`` or ``{start, end[, schedule]}`` (a fixed schedule).

The shape of a mapping picks its model (``low``/``high`` -> Range, ...), so a bad value is reported
against that one model ("train.lr.high: missing") rather than once per member of a union.
"""

from __future__ import annotations

import math
import numbers
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)


class FieldError(ValueError):
    """A check's error about a field below the one the validator runs on: ``loc`` is appended to the
    location pydantic reports (a model validator of StudySpec otherwise reports the whole spec)."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class Strict(BaseModel):
    """Base of every spec model: unknown keys are errors, no coercion (``true`` is not the int 1,
    ``"0.1"`` is not a number), NaN and infinities are refused in every float field."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Range(Strict):
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)
    int: bool = False

    @model_validator(mode="after")
    def _check(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low must be <= high, but got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, but got low={self.low}")
        # What Optuna samples is what the trial gets: an int range is IntDistribution(low, high, step),
        # a stepped one low + k * step. A bound that int() would truncate (lr {low: .001, high: .1,
        # int: true} samples only 0) or a step wider than the range (one value) is refused here.
        if self.int:
            for key, v in (("low", self.low), ("high", self.high), ("step", self.step)):
                if v is not None and v != int(v):
                    raise ValueError(
                        f"int: true needs whole numbers, but got {key}={v:g} (Optuna would sample "
                        f"int({v:g}) = {int(v)})"
                    )
            if self.log and self.step not in (None, 1):
                raise ValueError(f"log: true takes no step with int: true, but got step={self.step:g}")
        if self.step is not None and self.high - self.low < self.step:
            raise ValueError(
                f"step {self.step:g} is wider than the range [{self.low:g}, {self.high:g}]: it samples only "
                f"low; write the value, or a smaller step"
            )
        if self.int and self.low == self.high:
            raise ValueError(f"an int range of one value ({self.low:g}); write the value instead")
        return self

    def reachable(self) -> list[float]:
        """The smallest and largest value Optuna can sample from this range."""
        if self.step is None:
            return [self.low, self.high]
        top = self.low + math.floor((self.high - self.low) / self.step + 1e-9) * self.step
        return [self.low, top]


class Choices(Strict):
    choices: list[Any] = Field(min_length=1)


class Grid(Strict):
    grid: list[Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Grid:
        check_unique(self.grid, "grid")
        return self


def check_unique(values: list[Any], field: str) -> None:
    """FieldError at ``field.i`` naming the first value listed twice (a duplicate runs the same thing
    twice, or is silently dropped)."""
    seen: list[Any] = []
    for i, v in enumerate(values):
        if any(v == w and isinstance(v, bool) == isinstance(w, bool) for w in seen):
            raise FieldError((field, i), f"{v!r} is listed twice; list each value once")
        seen.append(v)


class Each(Strict):
    """A regularizer parameter fixed at each listed value in turn: every value its own cell (the other
    hyperparameters searched per cell), so regularizers compare at matched strengths."""

    each: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Each:
        if len(set(self.each)) < len(self.each):
            raise ValueError(f"each: values must differ, but got {self.each}")
        return self


class Ramp(Strict):
    start: float
    end: float
    schedule: Literal["constant", "linear", "cosine"] = "linear"


VALUE_SHAPES = (
    "a number, {low, high[, log, step, int]}, {choices: [...]}, {grid: [...]}, {each: [...]} or "
    "{start, end[, schedule]}"
)
# Discriminator tags appear in pydantic's error locations; the "=" marks them for format_error to drop
# (a plain "choices" would clash with the field of the same name).
TAG_MARK = "="


def _fixed(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Real):
        if not math.isfinite(float(value)):
            raise ValueError(f"must be a finite number, but got {value!r}")
        return value
    raise ValueError(f"must be {VALUE_SHAPES}, but got {value!r}")


def _shape(value: Any) -> str | None:
    """Which model a value is: by class for a model instance, by its keys for a mapping."""
    for cls, tag in (
        (Range, "=range"),
        (Choices, "=choices"),
        (Grid, "=grid"),
        (Each, "=each"),
        (Ramp, "=ramp"),
    ):
        if isinstance(value, cls):
            return tag
    if not isinstance(value, dict):
        return "=fixed"
    keys = set(value)
    if keys & {"low", "high", "log", "step", "int"}:
        return "=range"
    if "choices" in keys:
        return "=choices"
    if "grid" in keys:
        return "=grid"
    if "each" in keys:
        return "=each"
    if keys & {"start", "end", "schedule"}:
        return "=ramp"
    return None


ParamValue = Annotated[
    Annotated[Any, AfterValidator(_fixed), Tag("=fixed")]
    | Annotated[Range, Tag("=range")]
    | Annotated[Choices, Tag("=choices")]
    | Annotated[Grid, Tag("=grid")]
    | Annotated[Each, Tag("=each")]
    | Annotated[Ramp, Tag("=ramp")],
    Discriminator(_shape, custom_error_type="value_shape", custom_error_message=f"must be {VALUE_SHAPES}"),
]


def endpoints(value: Any) -> list[Any]:
    """The concrete values a spec value can take at its extremes (for range validation)."""
    if isinstance(value, Range):
        return value.reachable()
    if isinstance(value, Choices):
        return list(value.choices)
    if isinstance(value, Grid):
        return list(value.grid)
    if isinstance(value, Each):
        return list(value.each)
    if isinstance(value, Ramp):
        return [value.start, value.end]
    return [value]


def check_number(value: Any, *, low: float, low_inclusive: bool) -> Any:
    """A numeric setting (train.lr, train.weight_decay): every value it can take is a finite real number
    (not a bool or a string) at least / above ``low``; ramps are refused (they are regularizer schedules)."""
    bound = f">= {low:g}" if low_inclusive else f"> {low:g}"
    if isinstance(value, (Ramp, Each)):
        raise ValueError(
            "must be a number or a searched value ({low, high}, {choices}, {grid}); {start, end} "
            "schedules and {each: [...]} strengths are only for regularizer parameters (use "
            "train.schedule for the learning rate)"
        )
    for v in endpoints(value):
        ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(float(v))
        if not ok or float(v) < low or (float(v) == low and not low_inclusive):
            raise ValueError(f"must be a finite number {bound}, but got {v!r}")
    return value


def _pack_size(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64):
        return value
    raise ValueError(f"must be an integer from 1 to 64 or 'auto', but got {value!r}")


# resources.trials_per_process: how many trials one process trains as one batched model.
PackSize = Annotated[int | Literal["auto"], BeforeValidator(_pack_size)]


def resolve_pack_size(size: int | str, model: str, batch_size: int, *, gpus: float) -> int:
    """Members per pack: ``size``, or for ``auto`` the measured best for the model and device.

    ``auto``, from bench/bench_fusion.md (2-core CPU, one thread per process): the batched-matmul path
    (mlp, cnn1d) gains most where a step is launch-bound, at small batches: quickstart mix (batch 32)
    1.9x / 2.6x / 3.2x at K = 4 / 8 / 16; mnist1d_noise mix (batch 128) 1.5x / 1.6x / 1.4x. Other
    models run alone on a CPU (PyTorch's vmapped convolutions cost as much per member as separate
    calls). With GPUs every model packs by 4: not measured here (no GPU was lent).
    """
    if size != "auto":
        return int(size)
    if gpus > 0:
        return 4
    if model not in ("mlp", "cnn1d"):
        return 1
    return 16 if batch_size <= 64 else 8
