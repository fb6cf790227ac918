"""Data describing regularizers: one ``ParamSpec`` per hyperparameter, one ``RegularizerInfo`` per loss.

These are the single source of truth for names, defaults, ranges and which value recovers plain
cross-entropy; spec validation, tuning search spaces and the constructors all check against them.
"""

from __future__ import annotations

import math
import numbers
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from study.registry import Registry
from study.regularizers._schedule import Schedule

ParamKind = Literal["float", "int", "bool", "choice"]
_KINDS = ("float", "int", "bool", "choice")


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    """One hyperparameter of a regularizer.

    Attributes:
        default: Value used when the parameter is not given.
        low: Lower bound, or None for unbounded (numeric kinds only).
        high: Upper bound, or None for unbounded (numeric kinds only).
        low_inclusive: Whether ``low`` itself is allowed.
        high_inclusive: Whether ``high`` itself is allowed.
        kind: ``float`` (ints accepted), ``int``, ``bool`` or ``choice`` (one of ``choices``).
        choices: The allowed values of a ``choice`` parameter.
        schedulable: Whether the value may be a schedule (see ``Schedule``); float parameters only.
        description: One line for help texts.
        neutral: The value at which the loss equals plain cross-entropy (other parameters at their
            defaults), or None when no value does (LogitNorm's temperature).
        optional: Whether None is accepted, meaning "feature off" (e.g. the confidence-penalty hinge).
    """

    default: Any
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    kind: ParamKind = "float"
    choices: tuple[Any, ...] = ()
    schedulable: bool = False
    description: str = ""
    neutral: float | None = None
    optional: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {', '.join(_KINDS)}, but got {self.kind!r}.")
        if self.kind == "choice" and not self.choices:
            raise ValueError("a choice parameter needs a non-empty choices tuple, but got ().")
        if self.schedulable and self.kind != "float":
            raise ValueError(f"only float parameters can be schedulable, but got kind {self.kind!r}.")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low must be <= high, but got low={self.low!r}, high={self.high!r}.")
        object.__setattr__(self, "choices", tuple(self.choices))

    def allowed(self) -> str:
        """Human-readable description of the allowed values, e.g. ``[-10, 1)``."""
        if self.kind == "bool":
            text = "a bool"
        elif self.kind == "choice":
            text = "one of " + ", ".join(map(repr, self.choices))
        else:
            lo = "(-inf" if self.low is None else ("[" if self.low_inclusive else "(") + _fmt(self.low)
            hi = "inf)" if self.high is None else _fmt(self.high) + ("]" if self.high_inclusive else ")")
            text = ("an integer in " if self.kind == "int" else "in ") + f"{lo}, {hi}"
        return text + (" or None" if self.optional else "")

    def in_range(self, x: float) -> bool:
        """Whether the number ``x`` satisfies the bounds (NaN and infinities never do)."""
        if not math.isfinite(x):
            return False
        if self.low is not None and (x < self.low or (x == self.low and not self.low_inclusive)):
            return False
        return not (self.high is not None and (x > self.high or (x == self.high and not self.high_inclusive)))

    def check(self, regularizer: str, name: str, value: Any) -> Any:
        """Check one value and return its canonical form.

        Floats come back as ``float`` (numpy scalars included), schedules as the canonical mapping
        ``{"schedule", "start", "end"}``.

        Raises:
            ValueError: Naming the regularizer, the parameter, the value and what is allowed.
        """
        if value is None and self.optional:
            return None
        bad = ValueError(f"{regularizer}: {name} must be {self.allowed()}, but got {value!r}.")
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise bad
            return value
        if isinstance(value, (Mapping, Schedule)):
            if not self.schedulable:
                raise ValueError(
                    f"{regularizer}: {name} cannot be scheduled (pass a number), but got {value!r}."
                )
            try:
                schedule = Schedule.parse(value)
            except ValueError as err:
                raise ValueError(f"{regularizer}: {name}: {err}") from None
            for end in ("start", "end"):
                x = getattr(schedule, end)
                if not self.in_range(x):
                    raise ValueError(
                        f"{regularizer}: {name} must be {self.allowed()} at both ends of its schedule, "
                        f"but got {end}={x!r}."
                    )
            return schedule.to_dict()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad
        if self.kind == "int":
            if not isinstance(value, numbers.Integral):
                raise bad
            value = int(value)
        else:
            value = float(value)
        if not self.in_range(value):
            raise bad
        return value


def check_params(
    regularizer: str, specs: Mapping[str, ParamSpec], params: Mapping[str, Any]
) -> dict[str, Any]:
    """Check ``params`` against ``specs`` and return them merged with the defaults, in spec order.

    Raises:
        ValueError: On an unknown parameter (naming it and the allowed ones) or a bad value.
    """
    unknown = [k for k in params if k not in specs]
    if unknown:
        allowed = ", ".join(specs) or "none"
        raise ValueError(f"{regularizer}: unknown parameter {unknown[0]!r} (allowed: {allowed}).")
    return {k: spec.check(regularizer, k, params.get(k, spec.default)) for k, spec in specs.items()}


@dataclass(frozen=True)
class RegularizerInfo:
    """Registry entry of one regularizer.

    Attributes:
        name: Registry name (``register`` refuses ``:``, which marks import paths; entries built from
            an import path carry the path as their name).
        factory: ``factory(**params) -> nn.Module`` whose ``forward(logits, targets)`` returns the
            batch-mean loss. Schedulable parameters reach it as a number or a schedule mapping.
        description: One line.
        params: Parameter name -> spec.
        strength: Name of the primary strength parameter (the one a study sweeps), or None (``ce``).
        reference: Citation.
        vmappable: The loss is a pure function of (logits, targets, numeric params), so the members of
            a pack that share it compute their losses in one vmapped call of a template instance with
            their own values (the loop over members cost as much as the model's own step at batch 32,
            K = 8, cnn1d). False loops per member: losses that carry state (soft labels, a generator),
            branch on a parameter's value, or come from an import path.
    """

    name: str
    factory: Callable[..., nn.Module]
    description: str = ""
    params: Mapping[str, ParamSpec] = field(default_factory=dict)
    strength: str | None = None
    reference: str = ""
    vmappable: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, but got {self.name!r}.")
        if not callable(self.factory):
            raise ValueError(f"{self.name}: factory must be callable, but got {self.factory!r}.")
        for key, spec in self.params.items():
            if not isinstance(spec, ParamSpec):
                raise ValueError(f"{self.name}: params[{key!r}] must be a ParamSpec, but got {spec!r}.")
            spec.check(self.name, f"{key} (default)", spec.default)
            if spec.neutral is not None:
                spec.check(self.name, f"{key} (neutral)", spec.neutral)
        if self.strength is not None and self.strength not in self.params:
            raise ValueError(
                f"{self.name}: strength must be one of its params ({', '.join(self.params) or 'none'}) "
                f"or None, but got {self.strength!r}."
            )
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``check_params`` for this regularizer: params merged with defaults, canonical values."""
        return check_params(self.name, self.params, params)


# Every built-in regularizer module registers itself here on import (``register(INFO)``);
# ``study.regularizers._registry`` imports each module of the package, so adding one is one new module.
REGULARIZERS: Registry[RegularizerInfo] = Registry("regularizer")


def register(info: RegularizerInfo) -> RegularizerInfo:
    """Add ``info`` to the registry under ``info.name`` and return it.

    Raises:
        ValueError: If ``info`` is not a RegularizerInfo, its name contains ``:`` or is taken.
    """
    if not isinstance(info, RegularizerInfo):
        raise ValueError(f"register needs a RegularizerInfo, but got {info!r}.")
    if ":" in info.name:
        raise ValueError(
            f"a registered name must not contain ':' (it marks import paths), but got {info.name!r}."
        )
    return REGULARIZERS.register(info)
