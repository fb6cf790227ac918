"""A corpus of broken specs, generated here, through `study validate` and `study run`: every one exits 2
with one line naming the field, no traceback, nothing written, and Ray never started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from study.cli import app
from study.sweep import tune

GOOD = {
    "name": "corpus",
    "models": ["mlp"],
    "regularizers": {"ce": {}, "label_smoothing": {"alpha": 0.1}},
    "train": {"epochs": 1},
    "search": {"trials_per_cell": 1},
    "final": {"seeds": 1},
}


def _with(path: str, value: object) -> str:
    """GOOD with one dotted field set (lists addressed by index), as YAML text."""
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    node = raw
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
    return yaml.safe_dump(raw, sort_keys=False)


GOOD_TEXT = yaml.safe_dump(GOOD, sort_keys=False)
BOMB = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcde", "bcdef", strict=True)
)
NAN, INF = float("nan"), float("inf")

# (id, file bytes, what the one line must contain: the field path and the rule)
CORPUS: list[tuple[str, bytes, list[str]]] = [
    (k, t.encode(), needles)
    for k, t, needles in [
        ("lr-string", _with("train.lr", "fast"), ["train.lr", "finite number > 0"]),
        ("lr-range-string", _with("train.lr", {"low": "a", "high": 0.1}), ["train.lr.low", "valid number"]),
        ("lr-choices-strings", _with("train.lr", {"choices": ["a", "b"]}), ["train.lr", "'a'"]),
        ("lr-grid-bool", _with("train.lr", {"grid": [True]}), ["train.lr", "finite number > 0"]),
        (
            "reg-choices-strings",
            _with("regularizers.label_smoothing.alpha", {"choices": ["x"]}),
            ["regularizers.label_smoothing.alpha", "must be in"],
        ),
        ("lr-nan", _with("train.lr", NAN), ["train.lr", "finite"]),
        ("lr-high-inf", _with("train.lr", {"low": 0.01, "high": INF}), ["train.lr.high", "finite"]),
        ("lr-low-nan", _with("train.lr", {"low": NAN, "high": 0.1}), ["train.lr.low", "finite"]),
        ("eps-nan", _with("evaluate", {"attacks": ["fgsm"], "eps": [NAN]}), ["evaluate.eps.0", "finite"]),
        ("cpus-inf", _with("resources.cpus_per_trial", INF), ["resources.cpus_per_trial", "finite"]),
        ("cpus-1e30", _with("resources.cpus_per_trial", 1e30), ["resources.cpus_per_trial", "1024"]),
        ("momentum-nan", _with("train.momentum", NAN), ["train.momentum", "finite"]),
        (
            "reg-nan",
            _with("regularizers.label_smoothing.alpha", NAN),
            ["regularizers.label_smoothing.alpha", "finite"],
        ),
        ("lr-negative", _with("train.lr", -0.1), ["train.lr", "> 0", "-0.1"]),
        ("lr-zero", _with("train.lr", 0), ["train.lr", "> 0"]),
        ("lr-range-negative", _with("train.lr", {"low": -1.0, "high": 0.1}), ["train.lr", "-1.0"]),
        ("wd-negative", _with("train.weight_decay", -1e-4), ["train.weight_decay", ">= 0"]),
        ("lr-ramp", _with("train.lr", {"start": 0.1, "end": 0.01}), ["train.lr", "train.schedule"]),
        (
            "model-option",
            _with("models", [{"name": "mlp", "options": {"hiden": [10]}}]),
            ["models.0.options.hiden", "unknown option (allowed: hidden)"],
        ),
        (
            "dataset-option",
            _with("dataset", {"name": "mnist1d", "options": {"num_sample": 10}}),
            ["dataset.options.num_sample", "num_samples", "max_train"],
        ),
        (
            "student-option",
            _with("distill", {"student": "mlp", "student_options": {"width": 3}}),
            ["distill.student_options.width", "hidden"],
        ),
        (
            "cpus-machine",
            _with("resources.cpus_per_trial", (os.cpu_count() or 1) + 1),
            ["resources.cpus_per_trial", f"a local run has {os.cpu_count()} CPUs"],
        ),
        (
            "gpus-machine",
            _with("resources.gpus_per_trial", torch.cuda.device_count() + 1),
            ["resources.gpus_per_trial", f"a local run has {torch.cuda.device_count()} GPUs"],
        ),
        ("noise-empty", _with("noise", []), ["noise", "at least 1"]),
        ("rate-empty", _with("noise", [{"kind": "symmetric", "rate": []}]), ["noise.0.rate", "at least 1"]),
        ("duplicate-train", GOOD_TEXT + "train: {epochs: 50}\n", ["duplicate key 'train'", "first at line"]),
        ("epochs-bool", _with("train.epochs", True), ["train.epochs", "valid integer", "True"]),
        ("seeds-float", _with("final.seeds", 2.5), ["final.seeds", "valid integer"]),
        ("milestone-1", _with("train.milestones", [0.5, 1.0]), ["train.milestones.1", "less than 1"]),
        ("milestone-0", _with("train.milestones", [0.0]), ["train.milestones.0", "greater than 0"]),
        ("name-dot", _with("name", "."), ["name", "not '.' or '..'"]),
        ("name-dotdot", _with("name", ".."), ["name", "not '.' or '..'"]),
        ("name-long", _with("name", "n" * 101), ["name", "1-100"]),
        ("name-slash", _with("name", "a/b"), ["name", "letters, digits"]),
        (
            "alias-bomb",
            BOMB + _with("regularizers.label_smoothing.alpha", "X").replace("'X'", "*f"),
            ["expands to more than"],
        ),
        (
            "too-many-cells",
            _with("noise", [{"kind": "symmetric", "rate": [i / 10_000 for i in range(1, 5001)]}]),
            ["10000 cells", "more than the 5000 allowed"],
        ),
        ("too-many-trials", _with("search.trials_per_cell", 10**9), ["search.trials_per_cell", "trials"]),
        ("range-missing-high", _with("train.lr", {"low": 0.01}), ["train.lr.high", "missing"]),
        (
            "reg-range-missing-high",
            _with("regularizers.label_smoothing.alpha", {"low": 0.1, "log": True}),
            ["regularizers.label_smoothing.alpha.high", "missing"],
        ),
        ("value-shape", _with("train.lr", {"lo": 0.1, "hi": 1}), ["train.lr", "{low, high"]),
        ("reg-unknown-param", _with("regularizers.label_smoothing.beta", 0.1), ["label_smoothing.beta"]),
        ("reg-unknown", _with("regularizers.nope", {}), ["regularizers.nope", "unknown regularizer"]),
    ]
] + [
    ("utf16", GOOD_TEXT.encode("utf-16"), ["not UTF-8", "UTF-16"]),
    ("utf16-le-no-bom", GOOD_TEXT.encode("utf-16-le"), ["not UTF-8"]),
    ("latin1", GOOD_TEXT.encode() + "# caf\u00e9\n".encode("latin-1"), ["not UTF-8", "0xe9"]),
]


@pytest.mark.parametrize(("content", "needles"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_bad_spec_is_refused_by_validate_and_run(tmp_path: Path, content: bytes, needles: list[str]):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(content)
    out = tmp_path / "results"
    for args in (["validate", str(spec)], ["run", str(spec), "--out", str(out), "--quiet"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args[0], res.output)
        assert isinstance(res.exception, SystemExit)  # no other exception escaped
        line = res.output.strip()
        assert len(line.splitlines()) == 1 and line.startswith("error:"), line
        for needle in needles:
            assert needle in line, (needle, line)
        # Neither pydantic's internals nor a path that names nothing.
        assert "function-after" not in line and "<root>" not in line and "=range" not in line
        assert "unknown key" not in line or "high" not in line
    assert not out.exists()  # nothing written
    assert not (tmp_path / "corpus").exists() and not Path("results/corpus").exists()
    assert tune._current_handle is None  # init_ray was never called


def test_the_good_spec_of_the_corpus_validates(tmp_path: Path):
    """The corpus differs from a valid spec in one field each: the base itself passes."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD_TEXT)
    res = CliRunner().invoke(app, ["validate", str(spec)])
    assert res.exit_code == 0, res.output


def test_yaml_12_floats_and_merge_keys_still_load(tmp_path: Path):
    """`1e-3` is a float (YAML 1.1 read it as the string '1e-3'); a merged key overridden is no duplicate."""
    from study.spec import parse_spec

    text = GOOD_TEXT.replace("train:\n  epochs: 1\n", "train:\n  <<: {epochs: 2}\n  epochs: 1\n  lr: 1e-3\n")
    spec = parse_spec(text)
    assert spec.train.lr == pytest.approx(1e-3) and spec.train.epochs == 1
