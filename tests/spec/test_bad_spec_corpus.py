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
CORPUS: list[tuple[str, bytes, list[str]]] = (
    [
        (k, t.encode(), needles)
        for k, t, needles in [
            ("lr-string", _with("train.lr", "fast"), ["train.lr", "finite number > 0"]),
            (
                "lr-range-string",
                _with("train.lr", {"low": "a", "high": 0.1}),
                ["train.lr.low", "valid number"],
            ),
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
            (
                "rate-empty",
                _with("noise", [{"kind": "symmetric", "rate": []}]),
                ["noise.0.rate", "at least 1"],
            ),
            (
                "duplicate-train",
                GOOD_TEXT + "train: {epochs: 50}\n",
                ["duplicate key 'train'", "first at line"],
            ),
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
            # issue 24, item 3: option values, by the loader's and builders' own rules
            (
                "max-train-negative",
                _with("dataset.options", {"max_train": -5}),
                ["dataset.options.max_train", "-5"],
            ),
            (
                "num-samples-string",
                _with("dataset.options", {"num_samples": "many"}),
                ["dataset.options.num_samples", "'many'"],
            ),
            (
                "train-split-2",
                _with("dataset.options", {"train_split": 2.0}),
                ["dataset.options.train_split", "2.0"],
            ),
            (
                "hidden-string",
                _with("models", [{"name": "mlp", "options": {"hidden": "wide"}}]),
                ["models.0.options.hidden", "'wide'"],
            ),
            (
                "hidden-zero",
                _with("models", [{"name": "mlp", "options": {"hidden": [0]}}]),
                ["models.0.options.hidden", "[0]"],
            ),
            (
                "student-hidden-string",
                _with("distill", {"student": "mlp", "student_options": {"hidden": "wide"}}),
                ["distill.student_options.hidden", "'wide'"],
            ),
            (
                "device-cuda0",
                _with("train.device", "cuda:0"),
                ["train.device", "cuda:0"],
            ),
            (
                "cifar-root-empty",
                _with("dataset", {"name": "cifar10", "root": "/nonexistent-regstudy-data"}).replace(
                    "- mlp", "- cnn"
                ),
                ["dataset.root", "cifar10: no data under /nonexistent-regstudy-data"],
            ),
            (
                "empty-validation",
                _with("dataset", {"name": "mnist1d", "options": {"max_train": 2}, "val_fraction": 0.1}),
                ["dataset.val_fraction", "validation split empty"],
            ),
            (
                "label-file-and-bad-option",
                _with("dataset", {"name": "mnist1d", "options": {"max_train": -5}}).replace(
                    "name: corpus", "name: corpus\nnoise: [{kind: file, path: labels.npy}]"
                ),
                ["dataset.options.max_train"],
            ),
            # issue 24, item 4: every value the spec can produce
            (
                "lr-int-collapses",
                _with("train.lr", {"low": 0.001, "high": 0.1, "int": True}),
                ["train.lr", "int(0.001) = 0"],
            ),
            (
                "alpha-int-collapses",
                _with("regularizers.label_smoothing.alpha", {"low": 0.0, "high": 0.3, "int": True}),
                ["regularizers.label_smoothing.alpha", "int: true needs whole numbers", "high=0.3"],
            ),
            (
                "step-wider-than-range",
                _with("train.lr", {"low": 0.01, "high": 0.02, "step": 0.5}),
                ["train.lr", "step 0.5"],
            ),
            (
                "search-seed-2-64",
                _with("search.seed", 2**64),
                ["search.seed", "less than or equal to 2147483647"],
            ),
            (
                "threshold-no-bounds",
                _with("search.pruner", {"kind": "threshold"}),
                ["search.pruner", "lower and/or upper"],
            ),
            ("cpus-1e-9", _with("resources.cpus_per_trial", 1e-9), ["resources.cpus_per_trial", "0.01"]),
            ("gpus-1e-9", _with("resources.gpus_per_trial", 1e-9), ["resources.gpus_per_trial", "0.01"]),
            (
                "adaptive-reference-unknown",
                _with("final.seeds", {"min": 2, "max": 3, "reference": "nope"}),
                ["final.seeds.reference", "'nope'"],
            ),
            (
                "mode-on-symmetric",
                _with("noise", [{"kind": "symmetric", "rate": [0.2], "mode": "confident"}]),
                ["noise.0.mode", "takes no mode"],
            ),
            (
                "rate-on-none",
                _with("noise", [{"kind": "none", "rate": [0.2]}]),
                ["noise.0.rate", "takes no rate"],
            ),
            ("eps-without-attacks", _with("evaluate", {"eps": [0.1]}), ["evaluate.eps", "no attacks"]),
            (
                "severities-empty",
                _with("evaluate", {"corruptions": ["gaussian_noise"], "severities": []}),
                ["evaluate.severities", "at least 1"],
            ),
            (
                "eps-duplicate",
                _with("evaluate", {"attacks": ["fgsm"], "eps": [0.1, 0.1]}),
                ["evaluate.eps.1", "listed twice"],
            ),
            (
                "attacks-duplicate",
                _with("evaluate", {"attacks": ["fgsm", "fgsm"], "eps": [0.1]}),
                ["evaluate.attacks.1", "'fgsm'"],
            ),
            (
                "corruptions-duplicate",
                _with("evaluate", {"corruptions": ["gaussian_noise", "gaussian_noise"]}),
                ["evaluate.corruptions.1", "listed twice"],
            ),
            (
                "severities-duplicate",
                _with("evaluate", {"corruptions": ["gaussian_noise"], "severities": [2, 2]}),
                ["evaluate.severities.1", "listed twice"],
            ),
            ("grid-duplicate", _with("train.lr", {"grid": [0.1, 0.1]}), ["train.lr.grid.1", "listed twice"]),
            (
                "warmup-ge-epochs",
                _with("train", {"epochs": 3, "warmup_epochs": 3}),
                ["train.warmup_epochs", "less than epochs"],
            ),
            ("name-newline", _with("name", "x\n"), ["name", "'x\\n'"]),
            ("name-markup", _with("name", "[/bold]"), ["name", "'[/bold]'"]),
            ("name-emoji", _with("name", ":smile:"), ["name", "':smile:'"]),
            (
                "key-capital",
                _with("regularizers.label_smoothing.Alpha", 0.1),
                ["regularizers.label_smoothing.Alpha"],
            ),
            ("key-capital-top", _with("Train", {"epochs": 1}), ["Train", "unknown key"]),
            ("key-markup", _with("train.[/x]", 1), ["train.[/x]", "unknown key"]),
            (
                "seeds-until-forever",
                _with("final.seeds", {"min": 2, "max": 3, "until": "forever"}),
                ["final.seeds.until", "'forever'"],
            ),
        ]
    ]
    + [
        (
            "epochs-sexagesimal",
            GOOD_TEXT.replace("epochs: 1", "epochs: 1:30").encode(),
            ["train.epochs", "'1:30'"],
        ),
        (
            "ten-megabytes",
            (GOOD_TEXT + "#" + "x" * 10_000_000 + "\n").encode(),
            ["10000", "bytes", "1000000 allowed"],
        ),
    ]
    + [
        ("utf16", GOOD_TEXT.encode("utf-16"), ["not UTF-8", "UTF-16"]),
        ("utf16-le-no-bom", GOOD_TEXT.encode("utf-16-le"), ["not UTF-8"]),
        ("latin1", GOOD_TEXT.encode() + "# caf\u00e9\n".encode("latin-1"), ["not UTF-8", "0xe9"]),
    ]
)


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
