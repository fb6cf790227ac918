"""Spec checks beyond one field: names looked up in the dataset / model / corruption registries,
combinations of fields, and the one-line error message of a pydantic ValidationError.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from study import data, models
from study import noise as noise_lib
from study.robustness import corruptions
from study.spec._models import SpecError, StudySpec, TrainSpec
from study.spec._values import TAG_MARK, FieldError, Range, Strict

# Bounds on what one spec may expand to: far above any real study (the largest shipped spec has 216
# cells, 3672 trials), low enough that a typo or an alias bomb fails here instead of filling the disk.
MAX_CELLS = 5_000
MAX_TRIALS = 200_000


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


# pydantic's words for these say less than ours.
_MESSAGES = {"missing": "missing (required)", "extra_forbidden": "unknown key"}


def _model_names(cls: type = Strict) -> set[str]:
    """Names of the spec's models: pydantic puts a union member's class name in error locations."""
    return {n for sub in cls.__subclasses__() for n in (sub.__name__, *_model_names(sub))}


def _is_tag(part: str) -> bool:
    """A union member's or a constraint's name in a pydantic error location, not a spec key (a key
    such as ``Alpha`` is kept: only the spec's own model names, e.g. int | AdaptiveSeeds, are dropped)."""
    plain_union = part in ("int", "float", "str", "bool") or part in _model_names()
    wrapper = re.match(r"^[a-z][a-z_-]*\[", part) is not None  # function-after[...], literal['all']
    return part.startswith(TAG_MARK) or wrapper or part.startswith("constrained-") or plain_union


def loc_path(err: ErrorDetails) -> tuple[str | int, ...]:
    """A pydantic error's field path as the spec spells it: value-shape tags and union members such as
    ``literal['all']`` dropped, a FieldError's own path (below the validated model) appended."""
    loc = [p for p in err["loc"] if not (isinstance(p, str) and _is_tag(p))]
    exc = (err.get("ctx") or {}).get("error")
    if isinstance(exc, FieldError):
        loc.extend(exc.loc)
    return tuple(loc)


def error_message(err: ErrorDetails) -> str:
    """The problem, in words, with the offending value for type and bound errors."""
    if err["type"] in _MESSAGES:
        return _MESSAGES[err["type"]]
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if err["type"] not in ("value_error", "value_shape") and not isinstance(value, (dict, list)):
        msg += f", but got {value!r}"[:80]
    return msg


def format_error(exc: ValidationError, text: str) -> str:
    errors = exc.errors()
    # A union member whose type does not fit the value (`int` for a mapping) names the wrong field
    # (final.seeds: {until: forever} is an AdaptiveSeeds with a bad `until`, not a bad integer).
    fitting = [
        e for e in errors
        if not (e["type"].endswith("_type") and isinstance(e.get("input"), (dict, list)) and len(errors) > 1)
    ]  # fmt: skip
    errors = fitting or errors
    # A field whose own check failed (e.g. "low must be <= high") says more than a type error elsewhere.
    err = next((e for e in errors if e["type"] == "value_error"), None) or next(
        (e for e in errors if e["type"] == "extra_forbidden"), errors[0]
    )
    loc = loc_path(err)
    path = ".".join(str(p) for p in loc) or "spec"
    line = yaml_line(text, loc)
    where = f" (line {line})" if line else ""
    return f"{path}{where}: {error_message(err)}"


def check_local_resources(spec: StudySpec, source: str) -> None:
    """A local run gets this machine's CPUs and GPUs: a trial that needs more would stay pending forever.

    Ray counts ``os.cpu_count()`` CPUs (or a container's quota) and the GPUs CUDA shows.
    """
    import torch

    res = spec.resources
    cpus = os.cpu_count() or 1
    if res.cpus_per_trial > cpus:
        raise SpecError(
            f"{source}: resources.cpus_per_trial: a local run has {cpus} CPUs, but got "
            f"{res.cpus_per_trial:g} (allowed: 0 < cpus_per_trial <= {cpus}, or a cluster via --address)"
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if res.gpus_per_trial > gpus:
        raise SpecError(
            f"{source}: resources.gpus_per_trial: a local run has {gpus} GPUs, but got "
            f"{res.gpus_per_trial:g} (allowed: 0 <= gpus_per_trial <= {gpus}, or a cluster via --address)"
        )
    check_device(spec, source)


def _check_options(source: str, path: str, given: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise SpecError(
            f"{source}: {path}.{unknown[0]}: unknown option (allowed: {', '.join(sorted(allowed)) or 'none'})"
        )


def _check_size(spec: StudySpec, source: str) -> None:
    settings = sum(len(n.settings()) for n in spec.noise)
    cells = len(spec.models) * len(spec.regularizers) * settings
    if cells > MAX_CELLS:
        raise SpecError(
            f"{source}: the spec expands to {cells} cells (models x regularizers x noise settings), "
            f"more than the {MAX_CELLS} allowed; split it into several studies"
        )
    trials = cells * (spec.search.trials_per_cell + spec.final.max_seeds)
    if trials > MAX_TRIALS:
        raise SpecError(
            f"{source}: search.trials_per_cell: {cells} cells x ({spec.search.trials_per_cell} search + "
            f"{spec.final.max_seeds} final) = {trials} trials, more than the {MAX_TRIALS} allowed"
        )


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
    _check_options(source, "dataset.options", spec.dataset.options, data.dataset_options(spec.dataset.name))
    for i, m in enumerate(spec.models):
        allowed = models.model_options(m.name)
        if allowed is not None:  # tv:<name> takes torchvision's keyword arguments, unknown here
            _check_options(source, f"models.{i}.options", m.options, allowed)
    if spec.distill and (allowed := models.model_options(spec.distill.student)) is not None:
        _check_options(source, "distill.student_options", spec.distill.student_options, allowed)
    _check_size(spec, source)
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


def check_unique_cells(spec: StudySpec, source: str) -> None:
    """Each cell id (``dataset/model/regularizer/noise label``) names one cell: a model listed twice
    (with other options too) or two noise settings with one label (a repeated rate or label set, two
    label files with one stem) would make cells share an Optuna study and records. Regularizers are
    mapping keys, unique already."""
    seen_models: dict[str, int] = {}
    for i, m in enumerate(spec.models):
        if (j := seen_models.setdefault(m.name, i)) != i:
            raise SpecError(
                f"{source}: models.{i}: model {m.name!r} is listed twice (also models.{j}); a cell id names "
                "the model, so list each model once (compare its options in separate studies)"
            )
    seen_noise: dict[str, str] = {}
    for i, ns in enumerate(spec.noise):
        for k, setting in enumerate(ns.settings()):
            label = setting.label
            if setting.kind == "file":
                field_path = f"noise.{i}.path"
            elif setting.kind == "human":
                field_path = f"noise.{i}.label_set.{k}"
            else:
                field_path = f"noise.{i}.kind" if setting.kind == "none" else f"noise.{i}.rate.{k}"
            if (other := seen_noise.setdefault(label, field_path)) != field_path:
                raise SpecError(
                    f"{source}: {field_path}: gives the noise setting {label!r} of {other} again "
                    "(a cell id names the setting: each must be distinct)"
                )


def _option_path(prefix: str, options: dict[str, Any], message: str) -> str:
    """``prefix.<option>`` when the loader's / builder's message opens with one of the given options."""
    for key in options:
        if message.startswith(f"{key} ") or message.startswith(f"{key}:"):
            return f"{prefix}.{key}"
    return prefix


def check_device(spec: StudySpec, source: str) -> None:
    """``train.device`` names a device this machine has (a local run: a cluster's are unknown here)."""
    import torch

    device = spec.train.device
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            raise SpecError(
                f"{source}: train.device: {device!r}, but this machine has {count} CUDA devices "
                "(use device auto or cpu, or a cluster via --address)"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise SpecError(
            f"{source}: train.device: 'mps', but this machine has no MPS device (use auto or cpu)"
        )


def check_data(spec: StudySpec, source: str, *, download: bool = False) -> None:
    """Load the spec's dataset with its options and build every model and the student on it (meta
    device: no weights), by the loader's and builders' own rules, before anything runs: option values,
    missing files, a validation split left empty. Without ``download``, a dataset whose files are
    missing but would be downloaded (``download: true``) is not loaded (its option values are then
    checked when `study run` loads it).

    Raises:
        SpecError: one line naming the field.
    """
    import torch

    d = spec.dataset
    try:
        bundle = data.load_dataset(d.name, root=d.root, download=download and d.download, **d.options)
    except FileNotFoundError as exc:
        if d.download and not download:
            return
        raise SpecError(f"{source}: dataset.root: {str(exc).splitlines()[0]}") from None
    except ImportError as exc:
        raise SpecError(f"{source}: dataset.name: {str(exc).splitlines()[0]}") from None
    except (ValueError, TypeError) as exc:
        msg = str(exc).splitlines()[0].rstrip(".")
        raise SpecError(f"{source}: {_option_path('dataset.options', d.options, msg)}: {msg}") from None
    except (OSError, RuntimeError) as exc:  # an offline download (URLError, torchvision's RuntimeError)
        what = "download failed" if download and d.download else "cannot read the data"
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())[:200]
        raise SpecError(f"{source}: dataset: {d.name}: {what} ({reason})") from None
    train, val = data.split_train_val(len(bundle.y_train), d.val_fraction, seed=spec.noise_seed)
    if len(val) == 0 or len(train) == 0:
        empty = "validation" if len(val) == 0 else "training"
        raise SpecError(
            f"{source}: dataset.val_fraction: {d.val_fraction:g} of {len(bundle.y_train)} training samples "
            f"leaves the {empty} split empty"
        )
    built = [(f"models.{i}.options", m.name, m.options) for i, m in enumerate(spec.models)]
    if spec.distill:
        built.append(("distill.student_options", spec.distill.student, spec.distill.student_options))
    for path, name, options in built:
        try:
            with torch.device("meta"):
                models.create_model(name, bundle.input_shape, bundle.num_classes, **options)
        except (ValueError, TypeError, RuntimeError) as exc:
            msg = str(exc).splitlines()[0].rstrip(".")
            raise SpecError(f"{source}: {_option_path(path, options, msg)}: {msg}") from None
