"""Spec checks beyond one field: names looked up in the dataset / model / corruption registries,
combinations of fields, and the one-line error message of a pydantic ValidationError.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from study import data, models
from study import noise as noise_lib
from study.robustness import corruptions
from study.spec._models import Range, SpecError, StudySpec, TrainSpec


def yaml_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort YAML line (1-based) of a field path, by walking the composed YAML node tree."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            node = match[0][1]
            line = match[0][0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def format_error(exc: ValidationError, text: str) -> str:
    errors = exc.errors()
    # A value of a union type (number | range | choices | ...) fails once per member; the member whose
    # own check failed (e.g. "low must be <= high") says more than "Input should be a valid number".
    err = next((e for e in errors if e["type"] == "value_error"), None) or next(
        (e for e in errors if e["type"] == "extra_forbidden"), errors[0]
    )
    # Union members add their type names to the location; they mean nothing to the user.
    loc = tuple(
        p
        for p in err["loc"]
        if not (isinstance(p, str) and (p[:1].isupper() or p in {"float", "int", "str", "bool"}))
    )
    path = ".".join(str(p) for p in loc) or "<root>"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    line = yaml_line(text, loc)
    where = f" (line {line})" if line else ""
    return f"{path}{where}: {msg}"


def check_cross_fields(spec: StudySpec, source: str) -> None:
    """Checks that need other parts of the package (datasets, models, corruptions) but no data."""
    if spec.dataset.name not in data.list_datasets():
        raise SpecError(
            f"{source}: dataset.name: unknown dataset {spec.dataset.name!r} "
            f"(allowed: {', '.join(data.list_datasets())})"
        )
    known_models = models.list_models()
    for i, m in enumerate(spec.models):
        if m.name not in known_models and not m.name.startswith("tv:"):
            raise SpecError(
                f"{source}: models.{i}: unknown model {m.name!r} "
                f"(allowed: {', '.join(known_models)}, tv:<name>)"
            )
    if (
        spec.distill
        and spec.distill.student not in known_models
        and not spec.distill.student.startswith("tv:")
    ):
        raise SpecError(
            f"{source}: distill.student: unknown model {spec.distill.student!r} "
            f"(allowed: {', '.join(known_models)})"
        )
    data_kind = data.DATASETS[spec.dataset.name].kind
    named = [(f"models.{i}", m.name) for i, m in enumerate(spec.models)]
    if spec.distill:
        named.append(("distill.student", spec.distill.student))
    for field_path, name in named:
        entry = models.MODELS.get(name)
        needs = entry.input_kind if entry else ("image" if name.startswith("tv:") else "any")
        if needs not in ("any", data_kind):
            raise SpecError(
                f"{source}: {field_path}: model {name!r} needs {needs} inputs, but dataset "
                f"{spec.dataset.name!r} has {data_kind} inputs"
            )
    if spec.search.sampler == "grid":
        values = {f"train.{k}": getattr(spec.train, k) for k in TrainSpec.SEARCHABLE}
        for reg, params in spec.regularizers.items():
            values.update({f"regularizers.{reg}.{k}": v for k, v in params.items()})
        for path, value in values.items():
            if isinstance(value, Range):
                raise SpecError(
                    f"{source}: search.sampler: grid needs {{grid: [...]}} or {{choices: [...]}} values, "
                    f"not ranges ({path})"
                )
    kind = data.DATASETS[spec.dataset.name].kind
    names = spec.evaluate.corruptions
    if names != "all":
        for i, name in enumerate(names):
            try:
                corruptions.validate_corruption(name, 1, kind=kind)
            except ValueError as exc:
                raise SpecError(f"{source}: evaluate.corruptions.{i}: {exc}") from None
    if spec.train.device == "cuda" and spec.resources.gpus_per_trial == 0:
        raise SpecError(
            f"{source}: train.device: 'cuda' needs resources.gpus_per_trial > 0 (Ray hides the GPUs "
            "from trials that reserve none); set it (e.g. 0.25 packs 4 trials per GPU) or use device auto"
        )
    for i, ns in enumerate(spec.noise):
        if ns.kind == "human" and noise_lib.CIFARN[ns.dataset_labels].dataset != spec.dataset.name:
            expected = noise_lib.CIFARN[ns.dataset_labels].dataset
            raise SpecError(
                f"{source}: noise.{i}.dataset_labels: {ns.dataset_labels} relabels dataset {expected!r}, "
                f"but dataset.name is {spec.dataset.name!r}"
            )
    if spec.evaluate.attacks and not spec.evaluate.eps:
        raise SpecError(f"{source}: evaluate.eps: attacks are listed but no eps values are given")
    if "transfer" in spec.evaluate.attacks and "ce" not in spec.regularizers:
        raise SpecError(
            f"{source}: evaluate.attacks: 'transfer' crafts on the ce model of each cell, "
            "so regularizers must include ce"
        )
