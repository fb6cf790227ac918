"""Cell ids are unique: a spec whose cells would share an id (and so an Optuna study, records and
trial ids) is refused by `study validate` and `study run` (exit 2, one line naming the field, nothing
written, Ray never started); rates that `:g` rounds alike get distinct ids, and every cell runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from study.cli import app
from study.spec import parse_spec
from study.sweep import tune
from study.sweep.cells import expand_cells

BASE = {
    "name": "ids",
    "dataset": {"name": "mnist1d", "options": {"max_train": 400, "max_test": 200}},
    "models": ["mlp"],
    "regularizers": {"ce": {}},
    "train": {"epochs": 1, "batch_size": 128},
    "search": {"trials_per_cell": 1},
    "final": {"seeds": 1},
    "resources": {"cpus_per_trial": 1},
}


def _spec(tmp_path: Path, **fields: object) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**BASE, **fields}, sort_keys=False))
    return path


def _label_files(tmp_path: Path) -> tuple[str, str]:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "labels.csv").write_text("\n".join(["0"] * 400) + "\n")
    return str(tmp_path / "a" / "labels.csv"), str(tmp_path / "b" / "labels.csv")


COLLISIONS = {
    "model-twice-other-options": (
        {"models": [{"name": "mlp", "options": {"hidden": [h]}} for h in (32, 64)]},
        ["models.1", "'mlp' is listed twice", "models.0"],
    ),
    "repeated-noise-setting": (
        {"noise": [{"kind": "symmetric", "rate": [0.2]}, {"kind": "symmetric", "rate": 0.2}]},
        ["noise.1.rate.0", "'symmetric:0.2'", "noise.0.rate.0"],
    ),
    "repeated-rate-in-one-list": (
        {"noise": [{"kind": "symmetric", "rate": [0.2, 0.4, 0.2]}]},
        ["noise.0.rate.2", "'symmetric:0.2'", "noise.0.rate.0"],
    ),
    "label-files-with-one-stem": (
        {"noise": [{"kind": "file", "path": "{a}"}, {"kind": "file", "path": "{b}"}]},
        ["noise.1.path", "'file-labels'", "noise.0.path"],
    ),
}


@pytest.mark.parametrize("fields,needles", COLLISIONS.values(), ids=COLLISIONS.keys())
def test_a_cell_id_collision_is_refused_by_validate_and_run(tmp_path, fields, needles):
    a, b = _label_files(tmp_path)
    if "noise" in fields:
        fields = {"noise": [{k: str(v).format(a=a, b=b) if k == "path" else v for k, v in n.items()}
                            for n in fields["noise"]]}  # fmt: skip
    spec = _spec(tmp_path, **fields)
    out = tmp_path / "results"
    for args in (["validate", str(spec)], ["run", str(spec), "--out", str(out), "--quiet"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args[0], res.output)
        assert isinstance(res.exception, SystemExit)  # no traceback: nothing else escaped
        line = res.output.strip()
        assert len(line.splitlines()) == 1 and line.startswith("error:"), line
        for needle in needles:
            assert needle in line, (needle, line)
    assert not out.exists() and not Path("results/ids").exists()  # nothing written
    assert tune._current_handle is None  # Ray never started


def test_expand_cells_refuses_a_collision_that_skipped_the_check():
    spec = parse_spec(yaml.safe_dump(BASE))
    spec = spec.model_copy(update={"models": spec.models * 2})
    with pytest.raises(ValueError, match="two cells share the id 'mnist1d/mlp/ce/none'"):
        expand_cells(spec)


def test_rates_that_round_alike_get_distinct_ids():
    noise = [{"kind": "symmetric", "rate": [0.2, 0.2000001, 0.4]}]
    spec = parse_spec(yaml.safe_dump({**BASE, "noise": noise}))
    ids = [c.cell_id for c in expand_cells(spec)]
    # :g keeps the short form where it is exact; a rate it would round keeps every digit.
    assert ids == [
        "mnist1d/mlp/ce/symmetric:0.2",
        "mnist1d/mlp/ce/symmetric:0.2000001",
        "mnist1d/mlp/ce/symmetric:0.4",
    ]


@pytest.mark.slow
def test_every_cell_of_rates_that_round_alike_runs(tmp_path, env_cache):
    from study.sweep.runner import run_study

    noise = [{"kind": "symmetric", "rate": [0.2, 0.2000001]}]
    train = {"epochs": 1, "batch_size": 128, "lr": {"low": 1e-3, "high": 1e-2}}
    spec = _spec(tmp_path, noise=noise, train=train)
    res = CliRunner().invoke(app, ["validate", str(spec)])
    assert res.exit_code == 0 and "2 cells" in res.output, res.output
    out = run_study(spec, out=tmp_path / "out", quiet=True)
    trials = pd.read_parquet(out / "trials.parquet")
    per_cell = trials.groupby(["cell_id", "phase"]).size().to_dict()
    assert per_cell == {
        ("mnist1d/mlp/ce/symmetric:0.2", "search"): 1,
        ("mnist1d/mlp/ce/symmetric:0.2", "final"): 1,
        ("mnist1d/mlp/ce/symmetric:0.2000001", "search"): 1,
        ("mnist1d/mlp/ce/symmetric:0.2000001", "final"): 1,
    }
    assert set(trials["status"]) == {"completed"}
    assert trials["trial_id"].is_unique
    assert sorted(trials.drop_duplicates("cell_id")["noise_rate"]) == [0.2, 0.2000001]
