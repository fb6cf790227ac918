"""The spec hash: which results directory holds which study (a resume must run the same study)."""

from __future__ import annotations

import hashlib
import json

from study.spec._models import StudySpec

# Fields added after results directories already existed, left out of the hash while unset so that
# those studies still resume (their hash was computed without them).
_NEW_NOISE_FIELDS = ("dataset_labels", "label_set", "path")


def spec_hash(spec: StudySpec) -> str:
    """Hash of the resolved spec (defaults filled in), stable across key order and formatting.

    Left out: ``tracking`` (where runs are logged), ``search.keep_checkpoints`` (what stays on disk) and
    ``resources.trials_per_process`` (how trials share processes), ``margins`` (how verdicts read the
    results): none changes a result.
    """
    leave_out = {"tracking": True, "search": {"keep_checkpoints"}, "resources": {"trials_per_process"},
                 "margins": True}  # fmt: skip
    dump = spec.model_dump(mode="json", exclude=leave_out)
    if dump["search"]["replicas"] == 1:  # likewise for search replicas
        dump["search"].pop("replicas")
    if dump["seed"] == 0:  # as _NEW_NOISE_FIELDS: studies from before the study seed still resume
        dump.pop("seed")
    for noise in dump["noise"]:
        for key in _NEW_NOISE_FIELDS:
            if noise.get(key) is None:
                noise.pop(key, None)
    blob = json.dumps(dump, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
