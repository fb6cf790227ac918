"""Values echoed in error lines are plain text: rich markup and emoji codes in a spec value or an argument
are shown as written (no MarkupError, no text eaten, no emoji substituted)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from reports.synthetic import make_synthetic_study
from study.cli import app

runner = CliRunner()


@pytest.mark.parametrize("value", ["[/x]", "[/bold]", ":smile: [bold]x", "[red]a[/red] b"])
def test_report_reference_is_echoed_as_written(tmp_path: Path, value: str):
    d = tmp_path / "s"
    make_synthetic_study(d, models=("mlp",), noise_settings=("none",), search_trials=2, seeds=2)
    res = runner.invoke(app, ["report", str(d), "--reference", value, "--no-plots"])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: --reference") and repr(value) in line


@pytest.mark.parametrize("value", [":smile: [red]x", "[/bold]", "[b]adam[/b]"])
def test_spec_value_is_echoed_as_written(tmp_path: Path, value: str):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: x\nmodels: [mlp]\nregularizers: {{ce: {{}}}}\ntrain: {{optimizer: '{value}'}}\n")
    res = runner.invoke(app, ["validate", str(spec)])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "train.optimizer (line 4)" in line and repr(value) in line
