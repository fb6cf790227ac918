"""Values a spec can write that would be ignored or make nothing (issue 24): each refused on one line
naming the field, after the models have parsed the spec (``parse_spec`` calls ``check_refusals``).

A rule here is one the trial, the sweep or Ray would otherwise apply silently: a warm-up as long as the
run, a noise ``mode`` or ``rate`` its kind never reads, eps with no attack to use them, a value listed
twice, a threshold pruner with no threshold, a GPU share Ray rounds to 0, adaptive seeds compared with a
regularizer the study does not have.
"""

from __future__ import annotations

from typing import Any

from study import noise as noise_lib
from study.spec._models import SpecError, StudySpec


def _unique(source: str, path: str, values: list[Any]) -> None:
    seen: list[Any] = []
    for i, v in enumerate(values):
        if any(v == w and isinstance(v, bool) == isinstance(w, bool) for w in seen):
            raise SpecError(f"{source}: {path}.{i}: {v!r} is listed twice; list each value once")
        seen.append(v)


def check_refusals(spec: StudySpec, source: str) -> None:
    """SpecError (one line) on the first ignored or empty-making value."""
    for epochs, where in ((spec.train.epochs, "epochs"), (spec.final.epochs, "final.epochs")):
        if epochs is not None and spec.train.warmup_epochs and spec.train.warmup_epochs >= epochs:
            raise SpecError(
                f"{source}: train.warmup_epochs: must be less than {where} ({epochs}): the learning rate "
                f"would never reach its value, but got {spec.train.warmup_epochs}"
            )
    for i, ns in enumerate(spec.noise):
        entry = noise_lib.NOISE_REGISTRY.get(ns.kind)
        rateless = ns.kind == "none" or (entry is not None and not entry.uses_rate)
        if rateless and "rate" in ns.model_fields_set and (any(r != 0 for r in ns.rate) or len(ns.rate) > 1):
            raise SpecError(f"{source}: noise.{i}.rate: kind {ns.kind!r} takes no rate (it would be ignored)")
        # `mode` picks which samples adversarial noise flips (it reads reference probabilities).
        if ns.mode is not None and entry is not None and "probs" not in entry.inputs:
            raise SpecError(
                f"{source}: noise.{i}.mode: kind {ns.kind!r} takes no mode (only adversarial does)"
            )
        _unique(source, f"noise.{i}.rate", ns.rate)
        _unique(source, f"noise.{i}.label_set", ns.label_set or [])
    ev = spec.evaluate
    for field in ("attacks", "eps", "severities", "corruptions"):
        if isinstance(getattr(ev, field), list):
            _unique(source, f"evaluate.{field}", getattr(ev, field))
    if ev.eps and not ev.attacks:
        raise SpecError(
            f"{source}: evaluate.eps: eps values are given but no attacks (evaluate.attacks) use them"
        )
    pruner = spec.search.pruner
    if pruner.kind == "threshold" and pruner.lower is None and pruner.upper is None:
        raise SpecError(
            f"{source}: search.pruner: the threshold pruner needs lower and/or upper (the values it prunes "
            "outside)"
        )
    if pruner.lower is not None and pruner.upper is not None and pruner.lower > pruner.upper:
        raise SpecError(
            f"{source}: search.pruner.lower: must be <= upper ({pruner.upper}), but got {pruner.lower}"
        )
    if 0 < spec.resources.gpus_per_trial < 0.01:
        raise SpecError(
            f"{source}: resources.gpus_per_trial: must be 0 or at least 0.01 (Ray keeps 4 decimals), but got "
            f"{spec.resources.gpus_per_trial:g}"
        )
    if spec.train.device.startswith("cuda") and spec.resources.gpus_per_trial == 0:
        raise SpecError(
            f"{source}: train.device: {spec.train.device!r} needs resources.gpus_per_trial > 0 (Ray hides "
            "the GPUs from trials that reserve none); set it (e.g. 0.25 packs 4 trials per GPU) or use "
            "device auto"
        )
    seeds = spec.final.seeds
    if not isinstance(seeds, int) and seeds.reference not in spec.regularizers:
        raise SpecError(
            f"{source}: final.seeds.reference: {seeds.reference!r} is not a regularizer of this study "
            f"(allowed: {', '.join(spec.regularizers)}); seeds would never be added"
        )
