"""Schedules for regularizer strengths over training progress.

A schedulable parameter is given either as a number (constant), as ``{"start": a, "end": b}`` (a linear
ramp, as the MaxSup reference code ramps alpha from 0.1 to 0.2), or as
``{"schedule": "constant" | "linear" | "cosine", "start": a, "end": b}``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

ScheduleKind = Literal["constant", "linear", "cosine"]
SCHEDULE_KINDS: tuple[str, ...] = ("constant", "linear", "cosine")
_KEYS = ("schedule", "start", "end")


@dataclass(frozen=True)
class Schedule:
    """A value that moves from ``start`` to ``end`` as training progress goes from 0 to 1.

    Attributes:
        kind: ``constant`` (always ``start``; ``end`` must equal it), ``linear``, or ``cosine``
            (half-cosine annealing: slow near both ends, ``start + (end - start) * (1 - cos(pi p)) / 2``).
        start: Value at progress 0.
        end: Value at progress 1.

    Every value a schedule takes lies between ``start`` and ``end``, so checking the range of a
    parameter on both endpoints checks it for the whole run.
    """

    kind: ScheduleKind
    start: float
    end: float

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULE_KINDS)}, but got {self.kind!r}.")
        for key in ("start", "end"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"schedule {key} must be a finite number, but got {value!r}.")
            object.__setattr__(self, key, float(value))
        if self.kind == "constant" and self.start != self.end:
            raise ValueError(
                f"a constant schedule needs start == end (or no end), but got start={self.start!r}, "
                f"end={self.end!r}."
            )

    @classmethod
    def constant(cls, value: float) -> Schedule:
        """A schedule that always returns ``value``."""
        return cls("constant", value, value)

    @classmethod
    def parse(cls, spec: float | Mapping[str, Any] | Schedule) -> Schedule:
        """Build a schedule from a number, a mapping (see module docstring) or a schedule.

        Raises:
            ValueError: On unknown keys, a missing ``start``, an unknown kind or non-finite values.
        """
        if isinstance(spec, Schedule):
            return spec
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(_KEYS))
            if unknown:
                raise ValueError(
                    f"unknown schedule key(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(_KEYS)})."
                )
            if "start" not in spec:
                raise ValueError(f"a schedule needs a 'start' value, but got {dict(spec)!r}.")
            # {"start", "end"} alone means a linear ramp; a lone "start" means a constant.
            default_kind = "linear" if "end" in spec else "constant"
            kind = spec.get("schedule", default_kind)
            start = spec["start"]
            return cls(kind, start, spec.get("end", start))
        if isinstance(spec, bool) or not isinstance(spec, numbers.Real):
            raise ValueError(f"a schedule must be a number or a mapping, but got {spec!r}.")
        return cls.constant(spec)

    def value(self, progress: float) -> float:
        """The value at ``progress`` in [0, 1].

        Raises:
            ValueError: If ``progress`` is NaN or outside [0, 1].
        """
        check_progress(progress)
        if self.kind == "constant" or self.start == self.end:
            return self.start
        # Half-cosine: flat at both ends, the same shape as cosine learning-rate annealing.
        weight = progress if self.kind == "linear" else (1.0 - math.cos(math.pi * progress)) / 2.0
        return self.start + (self.end - self.start) * weight

    def to_dict(self) -> dict[str, Any]:
        """The canonical mapping form, accepted back by :meth:`parse`."""
        return {"schedule": self.kind, "start": self.start, "end": self.end}


def check_progress(progress: float) -> float:
    """Return ``progress`` as a float after checking it lies in [0, 1].

    Raises:
        ValueError: If ``progress`` is not a number in [0, 1] (NaN included).
    """
    if isinstance(progress, bool) or not isinstance(progress, numbers.Real) or not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], but got {progress!r}.")
    return float(progress)
