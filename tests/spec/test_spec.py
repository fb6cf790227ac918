"""The study spec: strict validation with field path and YAML line, expansion into cells, the plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from study.cli import app
from study.spec import Choices, Grid, Range, SpecError, load_spec, parse_spec, spec_hash
from study.sweep.cells import expand_cells

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
name: t
dataset: {name: mnist1d}
models: [mlp, cnn1d]
regularizers:
  ce: {}
  label_smoothing: {alpha: {low: 0.0, high: 0.4}}
  maxsup: {alpha: {start: 0.1, end: 0.2}}
  confidence_penalty: {beta: {choices: [0.1, 0.5]}}
noise:
  - {kind: none}
  - {kind: symmetric, rate: [0.2, 0.4]}
  - {kind: adversarial, mode: confident, rate: [0.2]}
train: {epochs: 5, lr: {low: 1.0e-4, high: 1.0e-2, log: true}}
search: {trials_per_cell: 3, sampler: tpe, pruner: {kind: median, n_warmup_steps: 2}}
final: {seeds: 2}
"""


def _with(path: str, value) -> str:
    """BASE with one dotted field replaced (lists addressed by index)."""
    raw = yaml.safe_load(BASE)
    node = raw
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return yaml.safe_dump(raw, sort_keys=False)


def test_expansion_counts_and_cell_ids():
    spec = parse_spec(BASE)
    cells = expand_cells(spec)
    # 2 models x 4 regularizers x (none + 2 symmetric rates + 1 adversarial rate)
    assert len(cells) == 2 * 4 * 4
    ids = [c.cell_id for c in cells]
    assert len(set(ids)) == len(ids)
    assert "mnist1d/cnn1d/maxsup/symmetric:0.4" in ids
    assert "mnist1d/mlp/ce/adversarial-confident:0.2" in ids
    ls = next(c for c in cells if c.regularizer == "label_smoothing")
    assert isinstance(ls.searched["alpha"], Range) and isinstance(ls.searched["lr"], Range)
    assert ls.fixed == {"weight_decay": 0.0}
    ms = next(c for c in cells if c.regularizer == "maxsup")
    # A ramp is a fixed schedule, not a searched range.
    assert ms.fixed["alpha"] == {"start": 0.1, "end": 0.2, "schedule": "linear"}
    cp = next(c for c in cells if c.regularizer == "confidence_penalty")
    assert isinstance(cp.searched["beta"], Choices)


def test_grid_and_int_ranges_are_expressible():
    text = _with("regularizers", {"focal": {"gamma": {"grid": [0, 1, 2, 3]}}})
    spec = parse_spec(text)
    cell = expand_cells(spec)[0]
    assert isinstance(cell.searched["gamma"], Grid)
    text = _with("train.batch_size", 64)
    assert parse_spec(text).train.batch_size == 64


def test_spec_hash_ignores_formatting_but_not_content():
    a = parse_spec(BASE)
    b = parse_spec(yaml.safe_dump(yaml.safe_load(BASE), sort_keys=True))
    assert spec_hash(a) == spec_hash(b)
    assert spec_hash(a) != spec_hash(parse_spec(_with("final.seeds", 3)))


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("regularizers.nope", {}, "unknown regularizer"),
        ("models.0", "resnet9000", "unknown model 'resnet9000'"),
        ("dataset.name", "imagenet22k", "unknown dataset 'imagenet22k'"),
        ("noise.1.kind", "gaussian", "gaussian"),
        ("search.pruner.kind", "magic", "unknown pruner 'magic'"),
        ("search.sampler", "bayes", "unknown sampler 'bayes'"),
        ("train.lr", {"low": 0.1, "high": 0.01}, "low must be <= high"),
        ("regularizers.label_smoothing", {"alpha": {"low": 0.0, "high": 1.0}}, "alpha must be in"),
        (
            "regularizers.label_smoothing",
            {"beta": 0.1},
            "label_smoothing.beta (line 10): unknown parameter (allowed: alpha)",
        ),
        ("noise.1.rate", [0.2, 1.5], "1.5"),
        ("train.epochs", 0, "train.epochs"),
        ("search.typo_key", 1, "search.typo_key"),
        ("evaluate.attacks", ["deepfool"], "deepfool"),
        ("evaluate.eps", [-0.1], "eps must be >= 0"),
        ("evaluate.severities", [0], "severity must be in 1..5"),
        ("resources.gpus_per_trial", 1.5, "resources.gpus_per_trial"),
        ("train.device", "cuda", "train.device: 'cuda' needs resources.gpus_per_trial > 0"),
    ],
)
def test_bad_specs_give_one_line_with_field(field, value, expected):
    text = _with(field, value)
    with pytest.raises(SpecError) as exc:
        parse_spec(text)
    msg = str(exc.value)
    assert "\n" not in msg
    assert expected in msg


def test_gpu_resources_that_ray_can_pack_are_accepted():
    for gpus in (0.25, 0.5, 1, 2):
        spec = parse_spec(_with("resources.gpus_per_trial", gpus))
        assert spec.resources.gpus_per_trial == gpus
    with_gpu = yaml.safe_load(_with("resources.gpus_per_trial", 0.5))
    with_gpu["train"]["device"] = "cuda"
    assert parse_spec(yaml.safe_dump(with_gpu)).train.device == "cuda"


def test_error_names_the_yaml_line(tmp_path):
    text = BASE.replace("search: {trials_per_cell: 3", "search: {trials_per_cel: 3")
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    line = 1 + text.splitlines().index(next(ln for ln in text.splitlines() if ln.startswith("search:")))
    assert f"search.trials_per_cel (line {line})" in str(exc.value)
    assert "unknown key" in str(exc.value)


def test_unknown_corruption_is_caught_at_validate_time():
    text = _with("evaluate", {"corruptions": ["fog"]})
    with pytest.raises(SpecError, match="fog"):
        parse_spec(text)


def test_validate_cli_prints_plan_and_exits_2_on_bad_spec(tmp_path):
    runner = CliRunner()
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    res = runner.invoke(app, ["validate", str(good)])
    assert res.exit_code == 0, res.output
    # 32 cells x 3 trials; 32 cells x 2 seeds; budget (96 + 64) x 5 epochs
    assert "96 trials" in res.output and "64 trials" in res.output and "800 epochs" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(_with("regularizers.label_smoothing", {"alpha": 1.0}))
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "alpha" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml")))
def test_shipped_specs_validate(name):
    spec = load_spec(ROOT / "search_spaces" / name)
    assert expand_cells(spec)


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("distill", {"student": "resnet20"}, "distill.student: model 'resnet20' needs image inputs"),
        ("models", ["cnn"], "models.0: model 'cnn' needs image inputs"),
        ("distill", {"student": "mlp", "temperature": 0}, "distill.temperature"),
    ],
)
def test_models_and_students_that_do_not_fit_the_data(field, value, expected):
    with pytest.raises(SpecError) as exc:
        parse_spec(_with(field, value))
    assert expected in str(exc.value)
