"""Matched strengths: `alpha: {each: [...]}` makes one cell per value with the strength fixed there and
the other hyperparameters searched, so two regularizers compare at the same strength."""

from __future__ import annotations

import pytest

from study.spec import SpecError, parse_spec
from study.sweep.cells import expand_cells
from study.sweep.records import _trial_row, trial_id_for, trial_key

SPEC = """\
name: matched
models: [mlp]
regularizers:
  ce: {}
  label_smoothing: {alpha: {each: [0.05, 0.1]}}
  maxsup: {alpha: {each: [0.05, 0.1]}}
noise: [{kind: none}, {kind: symmetric, rate: [0.4]}]
train: {lr: {low: 1.0e-3, high: 1.0e-1, log: true}}
search: {replicas: 2}
"""


def test_each_value_is_its_own_cell_with_the_strength_fixed():
    spec = parse_spec(SPEC)
    cells = expand_cells(spec)
    assert len(cells) == (1 + 2 + 2) * 2 * 2  # regularizer arms x noise settings x replicas
    arms = sorted({c.arm for c in cells})
    assert arms == [
        "ce", "label_smoothing@alpha=0.05", "label_smoothing@alpha=0.1",
        "maxsup@alpha=0.05", "maxsup@alpha=0.1",
    ]  # fmt: skip
    ls = next(c for c in cells if c.arm == "label_smoothing@alpha=0.1" and c.replica == 1)
    assert ls.cell_id == "mnist1d/mlp/label_smoothing@alpha=0.1/none/r1" and ls.searched.keys() == {"lr"}
    cfg = ls.trial_config(spec, {"lr": 0.01}, seed=0, phase="search")
    assert cfg.regularizer.name == "label_smoothing" and cfg.regularizer.params == {"alpha": 0.1}
    assert cfg.replica == 1
    # The reference cell of a matched cell is the plain ce cell of its data, noise and replica.
    assert ls.reference("ce").cell_id == "mnist1d/mlp/ce/none/r1"
    # The tables name the arm, keep the regularizer's strength and the replica.
    rec = {"key": trial_key("search", ls.cell_id, 0), "phase": "search", "status": "completed",
           "config": cfg.model_dump(mode="json"), "started_at": 0.0, "cell_id": ls.cell_id}  # fmt: skip
    rec["trial_id"] = trial_id_for(spec.name, rec["key"])
    row = _trial_row(spec, ls, rec)
    assert (row["cell_id"], row["regularizer"], row["replica"]) == (
        "mnist1d/mlp/label_smoothing@alpha=0.1/none", "label_smoothing@alpha=0.1", 1,
    )  # fmt: skip
    assert (row["strength_param"], row["strength"]) == ("alpha", 0.1)


def test_values_that_print_alike_get_distinct_cells():
    spec = parse_spec(SPEC.replace("[0.05, 0.1]}}\n  maxsup", "[0.1, 0.1000001]}}\n  maxsup"))
    ids = [c.cell_id for c in expand_cells(spec)]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("{each: [0.05, 0.1]}}\n  maxsup", "{each: [0.1, 0.1]}}\n  maxsup", "values must differ"),
        ("{each: [0.05, 0.1]}}\n  maxsup", "{each: [0.05, 2.0]}}\n  maxsup", "alpha"),
        ("{each: [0.05, 0.1]}}\n  maxsup", "{each: []}}\n  maxsup", "each"),
        ("lr: {low: 1.0e-3, high: 1.0e-1, log: true}", "lr: {each: [0.01, 0.1]}", "only for regularizer"),
    ],
)
def test_bad_matched_strengths_are_one_line(old, new, needle):
    with pytest.raises(SpecError, match=needle) as err:
        parse_spec(SPEC.replace(old, new, 1))
    assert "\n" not in str(err.value)
