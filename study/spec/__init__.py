"""The study spec: pydantic models of the YAML (``_models``), strict about unknown keys; checks across
fields and registries and one-line errors (``_checks``); ``load_spec`` / ``parse_spec`` here.

A cell is dataset x model x regularizer x noise setting (``study.sweep.cells`` expands a spec into them).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from study.spec._checks import check_cross_fields, format_error
from study.spec._models import (
    METRICS,
    Choices,
    DatasetSpec,
    DistillSpec,
    EvaluateSpec,
    FinalSpec,
    Grid,
    MlflowSpec,
    ModelSpec,
    NoiseSetting,
    NoiseSpec,
    PrunerSpec,
    Ramp,
    Range,
    ResourcesSpec,
    SearchSpec,
    SpecError,
    StudySpec,
    TrackingSpec,
    TrainSpec,
    WandbSpec,
    spec_hash,
)

__all__ = [
    "Choices",
    "DatasetSpec",
    "DistillSpec",
    "EvaluateSpec",
    "FinalSpec",
    "Grid",
    "METRICS",
    "ModelSpec",
    "NoiseSetting",
    "NoiseSpec",
    "PrunerSpec",
    "Ramp",
    "Range",
    "ResourcesSpec",
    "SearchSpec",
    "SpecError",
    "StudySpec",
    "TrackingSpec",
    "TrainSpec",
    "WandbSpec",
    "MlflowSpec",
    "spec_hash",
    "load_spec",
    "parse_spec",
]


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a spec file. Raises SpecError with a single line on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec ({exc.strerror})") from None
    return parse_spec(text, source=str(path))


def parse_spec(text: str, source: str = "<spec>") -> StudySpec:
    """Validate a spec's text; SpecError (one line: field path, YAML line, problem) on any problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SpecError(f"{source}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping with at least name, models, regularizers")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{source}: {format_error(exc, text)}") from None
    check_cross_fields(spec, source)
    return spec
