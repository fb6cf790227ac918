"""The layout's promises, checked on the source: no import cycle, ray in one module, small modules and
functions, a torch-free report and a Ray-free table writer, one vocabulary that the registries and the
evaluation agree with, and one TrialConfig whichever way a trial is described."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("study", "reports")
MAX_MODULE_LINES = 420  # "about 400"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Internal modules imported anywhere in the file (module level and inside functions alike).

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``; a relative
    import is resolved against the importing module's package.
    """
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import study.x.y` where y is an attribute
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(GRAPH):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_walks_real_edges():
    # Guards the walker itself: a broken resolver would find no edges and no cycle.
    assert "study.trial.fit" in GRAPH["study.trial.run"]
    assert "study.noise._maps" in GRAPH["study.noise._corrupt"]
    assert "study.sweep.tune" in GRAPH["study.sweep.runner"]  # an import inside a function
    assert sum(len(v) for v in GRAPH.values()) > 100


def test_no_import_cycle_among_the_packages_modules():
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_layers_only_import_downwards():
    # science core < spec < trial < sweep < cli; reports reads study only through the vocabulary.
    rank = {"trial": 2, "sweep": 3, "cli": 4}
    for name, deps in GRAPH.items():
        parts = name.split(".")
        if parts[0] == "reports":
            assert {d for d in deps if d.startswith("study")} <= {"study.vocabulary"}, name
            continue
        own = rank.get(parts[1], 0) if len(parts) > 1 else 0
        for dep in deps:
            dparts = dep.split(".")
            if dparts[0] == "study" and len(dparts) > 1:
                assert rank.get(dparts[1], 0) <= own, f"{name} imports the higher layer {dep}"


def test_ray_is_imported_by_exactly_one_module():
    importers = set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ray" for a in node.names):
                importers.add(name)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
                importers.add(name)
    assert importers == {"study.sweep.tune"}


def test_modules_and_functions_stay_small():
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text()
        lines = text.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = lines[node.lineno - 1 : node.end_lineno]
                # A long function must say why, in a comment starting "# Long:".
                if len(body) > MAX_FUNCTION_LINES and not any(
                    ln.strip().startswith("# Long:") for ln in body
                ):
                    too_long.append(f"{name}.{node.name}: {len(body)} lines")
    assert not too_long, too_long


def _fresh_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_report_builder_does_not_import_torch():
    code = "import sys, reports.build, reports.stats, reports.render, reports.plots, reports.query\n"
    code += "print('torch' in sys.modules, 'ray' in sys.modules)"
    assert _fresh_python(code) == "False False"


def test_writing_the_tables_does_not_import_ray(tmp_path):
    out = tmp_path / "results"
    (out / "records").mkdir(parents=True)
    code = (
        "import sys\nfrom study.spec import parse_spec\nfrom study.sweep.records import write_tables\n"
        "spec = parse_spec('name: t\\nmodels: [cnn1d]\\nregularizers: [ce]\\n')\n"
        f"write_tables(spec, __import__('pathlib').Path({str(out)!r}))\n"
        "print('ray' in sys.modules)"
    )
    assert _fresh_python(code) == "False"
    assert (out / "trials.parquet").is_file()


def test_the_vocabulary_and_the_registries_agree():
    from study import noise, vocabulary
    from study.robustness import attacks

    assert list(noise.NOISE_REGISTRY) == list(vocabulary.NOISE_KINDS)
    assert tuple(noise.ADVERSARIAL_MODES) == tuple(vocabulary.ADVERSARIAL_MODES)
    assert tuple(attacks.ATTACKS) == vocabulary.ATTACKS
    assert set(vocabulary.QUESTIONS) >= {m.question for m in vocabulary.METRICS if m.question}


def test_every_metric_a_final_trial_emits_is_in_the_vocabulary(tmp_path, monkeypatch):
    """The drift check: a metric computed but unknown to the vocabulary would never reach the report."""
    from study import vocabulary
    from study.trial.config import TrialConfig
    from study.trial.run import run_trial

    monkeypatch.setenv("REGSTUDY_CACHE", str(tmp_path))
    cfg = TrialConfig(
        dataset={"name": "mnist1d", "options": {"max_train": 300, "max_test": 200}},
        noise={"kind": "symmetric", "rate": 0.3},
        train={"epochs": 1, "device": "cpu"},
        evaluate={
            "attacks": ["fgsm", "pgd_ce"],
            "eps": [0.1],
            "corruptions": ["gaussian_noise"],
            "severities": [1],
            "pgd_steps": 2,
        },  # fmt: skip
    )
    rows = run_trial(cfg).eval_rows
    emitted = {r["metric"] for r in rows if not r["metric"].startswith(vocabulary.BIN_METRIC_PREFIX)}
    assert {"accuracy", "brier", "memorisation_rate", "gradient_masking"} <= emitted
    assert emitted <= set(vocabulary.METRIC_BY_NAME), emitted - set(vocabulary.METRIC_BY_NAME)
    conditions = {r["condition"] for r in rows}
    assert conditions - vocabulary.NON_CORRUPTION_CONDITIONS == {"gaussian_noise"}


def test_study_trial_without_options_equals_a_one_cell_spec():
    from study.cli.trial import trial_config_from_options
    from study.spec import parse_spec
    from study.sweep.cells import expand_cells

    spec = parse_spec("name: one\ndataset: {name: mnist1d}\nmodels: [cnn1d]\nregularizers: [ce]\n")
    (cell,) = expand_cells(spec)
    from_spec = cell.trial_config(spec, {}, seed=0, phase="final")
    from_cli = trial_config_from_options()
    assert from_cli == from_spec
    # The same holds with options set on both sides.
    spec = parse_spec(
        "name: one\nmodels: [mlp]\nregularizers: {label_smoothing: {alpha: 0.1}}\n"
        "noise: [{kind: symmetric, rate: 0.2}]\ntrain: {epochs: 7, lr: 0.005, batch_size: 64}\n"
    )
    (cell,) = expand_cells(spec)
    from_cli = trial_config_from_options(
        model="mlp", regularizer="label_smoothing", params=["alpha=0.1"], noise="symmetric:0.2",
        epochs=7, lr=0.005, batch_size=64,
    )  # fmt: skip
    assert from_cli == cell.trial_config(spec, {}, seed=0, phase="final")


def test_study_trial_json_reports_the_resolved_config(monkeypatch, tmp_path):
    from study.cli import app
    from study.cli.trial import trial_config_from_options

    monkeypatch.setenv("REGSTUDY_CACHE", str(tmp_path))
    result = CliRunner().invoke(app, ["trial", "--epochs", "1", "--json"])
    assert result.exit_code == 0, result.output
    import json

    config = json.loads(result.stdout.strip().splitlines()[-1])["config"]
    expected = trial_config_from_options(epochs=1).model_dump(mode="json")
    assert config == expected and config["train"]["lr"] == 0.02 and config["train"]["batch_size"] == 32


def test_a_noise_kind_is_one_registry_entry(tmp_path, monkeypatch):
    """The architecture doc's worked example: a new kind needs its flip function and one entry; the
    spec accepts it and the trial supplies the inputs it declares, with no other edit."""
    import numpy as np

    from study import noise
    from study.spec import parse_spec
    from study.sweep.cells import expand_cells
    from study.trial.run import prepare_data

    def flip_to_zero(rng, y, k, r, inputs):  # every r-th sample of the ordered set gets label 0
        assert inputs.dataset == "mnist1d"  # declared below, so the trial supplied it
        noisy = y.copy()
        noisy[rng.random(len(y)) < r] = 0
        return noisy, "to class 0"

    noise.NOISE_REGISTRY.register(noise.NoiseKind("to_zero", flip_to_zero, "flip to 0", ("dataset",)))
    try:
        monkeypatch.setenv("REGSTUDY_CACHE", str(tmp_path))
        spec = parse_spec(
            "name: z\ndataset: {name: mnist1d, options: {max_train: 300, max_test: 100}}\n"
            "models: [mlp]\nregularizers: [ce]\nnoise: [{kind: to_zero, rate: [0.5]}]\n"
        )
        (cell,) = expand_cells(spec)
        assert cell.cell_id == "mnist1d/mlp/ce/to_zero:0.5"
        prep = prepare_data(cell.trial_config(spec, {"lr": 0.01}, seed=0, phase="search"))
        assert prep.noisy.note == "to class 0"
        assert np.all(prep.noisy.labels[prep.noisy.flipped].numpy() == 0)
        assert 0.35 < prep.noisy.realized_rate < 0.55  # half flip, a tenth of those were 0 already
    finally:
        noise.NOISE_REGISTRY.remove("to_zero")


def test_a_dataset_and_a_model_are_one_registry_entry_each(tmp_path):
    """Register a dataset reader and a model builder; a trial on them runs end to end."""
    import torch
    from torch import nn

    from study import data, models
    from study.data._readers import RawSplits
    from study.trial.config import TrialConfig
    from study.trial.run import run_trial

    def blobs(root, download, n: int = 200):  # two Gaussian blobs as 1x4 signals
        g = torch.Generator().manual_seed(0)
        y = torch.arange(2 * n) % 2
        x = (torch.randn(2 * n, 1, 4, generator=g) + 3 * y[:, None, None]).float()
        return RawSplits(x[:n], y[:n], x[n:], y[n:])

    def linear(shape, k):
        return nn.Flatten(), shape[0] * shape[1]

    data.DATASETS.register(data.DatasetEntry("blobs", blobs, "signal", 2, "two blobs", ("n",)))
    models.MODELS.register(models.ModelEntry("flat", linear, "signal", "identity features"))
    try:
        cfg = TrialConfig(
            dataset={"name": "blobs", "options": {"n": 100}},
            model={"name": "flat"},
            train={"epochs": 3, "lr": 0.05, "device": "cpu"},
            evaluate={},
        )
        result = run_trial(cfg)
        assert result.status == "completed" and result.metric("accuracy") > 0.9
    finally:
        data.DATASETS.remove("blobs")
        models.MODELS.remove("flat")


def test_a_metric_added_to_the_vocabulary_reaches_the_report(tmp_path, monkeypatch):
    from reports.build import load_study, write_table
    from reports.render import build_tables
    from reports.synthetic import make_synthetic_study
    from study import vocabulary

    frames = make_synthetic_study(tmp_path / "s", seeds=2, search_trials=2)
    ev = frames["evals"]
    extra = ev[ev["metric"] == "accuracy"].assign(metric="my_margin", value=0.5)
    write_table(tmp_path / "s", "evals", pd_concat(ev, extra))
    metric = vocabulary.Metric("my_margin", "my margin", vocabulary.HIGHER, vocabulary.Q_CALIBRATION)
    titles = [t.title for t in build_tables(load_study(tmp_path / "s"))]
    assert not any("my margin" in t for t in titles)
    monkeypatch.setattr(vocabulary, "METRICS", (*vocabulary.METRICS, metric))
    titles = [t.title for t in build_tables(load_study(tmp_path / "s"))]
    assert any(t.endswith(": my margin") for t in titles)


def pd_concat(*frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("module", ["study.sweep.records", "study.sweep.context", "study.sweep.cells"])
def test_sweep_bookkeeping_modules_are_ray_free(module):
    assert _fresh_python(f"import sys, {module}; print('ray' in sys.modules)") == "False"


# The registry-parametrised tests, and how many of their cases each extension must get (at least).
EXTENSION_TESTS = {
    "tilted_ce": ["tests/science/test_regularizers.py", "tests/science/test_regularizers_registry.py"],
    "to_zero": ["tests/science/test_noise.py"],
    "my_margin": ["tests/reports/test_every_metric.py"],
    "blobs": ["tests/science/test_every_dataset.py"],
}


def test_an_extension_is_picked_up_by_the_parametrised_tests(tmp_path):
    """tests/extension.py registers a regularizer, a noise kind, a metric and a dataset at start-up, as a
    user's code would; the tests parametrised over the registries and the vocabulary run on each, and
    pass, with no edit to them."""
    import os
    import re

    files = sorted({f for fs in EXTENSION_TESTS.values() for f in fs})
    cmd = [sys.executable, "-m", "pytest", "-p", "extension", "-q", "-rA", "-p", "no:cacheprovider"]
    cmd += [*files, "-k", " or ".join(EXTENSION_TESTS), "-m", "not slow and not gpu"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    env["REGSTUDY_CACHE"] = str(tmp_path)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.findall(r"^PASSED (\S+)", proc.stdout, re.MULTILINE)
    for name, test_files in EXTENSION_TESTS.items():
        for f in test_files:
            ran = [p for p in passed if p.startswith(f) and name in p]
            assert ran, (name, f, passed)


# A path in docs/architecture.md: relative to study/ or reports/ (a module), or to the repo root;
# ``<name>`` stands for any name (``regularizers/_<name>.py``: every loss module).
DOC_PATH = r"[A-Za-z0-9_./<>-]+\.py"


def _doc_paths() -> tuple[set[str], list[re.Pattern[str]]]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    paths = set(re.findall(DOC_PATH, text)) | set(re.findall(r"([A-Za-z0-9_]+/)[\s`]", text))
    globs = [re.compile(re.escape(p).replace(re.escape("<name>"), r"[A-Za-z0-9_]+") + "$") for p in paths]
    return {p for p in paths if "<" not in p}, [g for g, p in zip(globs, paths, strict=True) if "<" in p]


def _doc_name(path: Path) -> str:
    """How the doc names a module: sweep/seeds.py, a package by its folder (sweep/, study/)."""
    parts = path.relative_to(ROOT).parts
    if path.name == "__init__.py":
        return "/".join(parts[1:-1] or parts[:1]) + "/"
    return "/".join(parts[1:])


def test_every_module_is_named_in_the_architecture_doc():
    named, globs = _doc_paths()
    missing = [
        path.relative_to(ROOT).as_posix()
        for path in MODULES.values()
        if _doc_name(path) not in named and not any(g.search(_doc_name(path)) for g in globs)
    ]
    assert not missing, f"modules not named in docs/architecture.md: {missing}"


def test_every_file_the_architecture_doc_names_exists():
    named, _ = _doc_paths()
    bases = (ROOT, ROOT / "study", ROOT / "reports")
    absent = [p for p in named if p.endswith(".py") and not any((b / p).is_file() for b in bases)]
    assert not absent, f"docs/architecture.md names files that are not in the repo: {absent}"
