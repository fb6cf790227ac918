"""The study spec: pydantic models of the YAML (``_models``), strict about unknown keys; checks across
fields and registries and one-line errors (``_checks``); ``load_spec`` / ``parse_spec`` here.

A cell is dataset x model x regularizer x noise setting (``study.sweep.cells`` expands a spec into them).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from study.spec import _yaml
from study.spec._checks import (
    check_cross_fields,
    check_data,
    check_device,
    check_local_resources,
    check_unique_cells,
    error_message,
    format_error,
    loc_path,
)
from study.spec._hash import spec_hash
from study.spec._models import (
    METRICS,
    AdaptiveSeeds,
    DatasetSpec,
    DistillSpec,
    EvaluateSpec,
    FinalSpec,
    MlflowSpec,
    ModelSpec,
    NoiseSetting,
    NoiseSpec,
    PrunerSpec,
    ResourcesSpec,
    SearchSpec,
    SpecError,
    StudySpec,
    TrackingSpec,
    TrainSpec,
    WandbSpec,
)
from study.spec._refusals import check_refusals
from study.spec._values import Choices, Each, Grid, Ramp, Range

__all__ = [
    "AdaptiveSeeds",
    "Choices",
    "DatasetSpec",
    "DistillSpec",
    "EvaluateSpec",
    "FinalSpec",
    "Each",
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
    "with_seed",
    "WandbSpec",
    "MlflowSpec",
    "spec_hash",
    "check_local_resources",
    "check_data",
    "check_device",
    "error_message",
    "loc_path",
    "load_spec",
    "parse_spec",
]


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a spec file. Raises SpecError with a single line on any problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec ({exc.strerror})") from None
    try:
        text = _yaml.decode(data)
    except _yaml.SpecYAMLError as exc:
        raise SpecError(f"{path}: {exc}") from None
    return parse_spec(text, source=str(path))


_SEED_LINE = re.compile(r"^seed[ \t]*:.*$", re.MULTILINE)


def with_seed(text: str, seed: int) -> str:
    """The spec's text with its top-level ``seed:`` set to `seed` (appended when absent): what
    ``study run --seed`` stores as the study's spec.yaml, so the stored spec is the study that ran."""
    line = f"seed: {seed}  # study run --seed"
    if _SEED_LINE.search(text):
        return _SEED_LINE.sub(line, text, count=1)
    return text.rstrip("\n") + "\n" + line + "\n"


def parse_spec(text: str, source: str = "<spec>") -> StudySpec:
    """Validate a spec's text; SpecError (one line: field path, YAML line, problem) on any problem."""
    try:
        raw = _yaml.load(text)
    except _yaml.SpecYAMLError as exc:
        where = f" (line {exc.line})" if exc.line else ""
        raise SpecError(f"{source}{where}: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping with at least name, models, regularizers")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{source}: {format_error(exc, text)}") from None
    check_cross_fields(spec, source)
    check_unique_cells(spec, source)
    check_refusals(spec, source)
    return spec
