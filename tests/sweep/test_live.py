"""The live table and the --quiet lines, driven the way Tune drives the searcher (no Ray): real Optuna
studies, real records, a rich Console that records what it prints, and a clock the test moves."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.console import Console

from study.spec import parse_spec
from study.sweep.cells import expand_cells
from study.sweep.context import StudyContext
from study.sweep.live import LiveView, short_names, startup_line
from study.sweep.optuna_cells import CellStudies
from study.sweep.runner import prepare_out_dir, set_status
from study.sweep.source import TrialSource
from study.vocabulary import MANIFEST_STATUSES

# val_nll: lower is better, so the best of a cell is its minimum.
SPEC = """\
name: live
dataset: {name: mnist1d}
models: [cnn1d]
regularizers:
  ce: {}
  label_smoothing: {alpha: {grid: [0.0, 0.1, 0.2]}}
noise: [{kind: none}, {kind: asymmetric, rate: [0.4]}]
train: {epochs: 2, lr: 0.01}
search: {trials_per_cell: 3, sampler: grid, pruner: {kind: none}, metric: val_nll}
final: {seeds: 2}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _setup(out: Path, quiet: bool, width: int = 80):
    spec = parse_spec(SPEC)
    cells = expand_cells(spec)
    console, clock = Console(record=True, width=width, color_system=None), Clock()
    holder: dict = {}
    view = LiveView(spec, lambda: holder.get("ctx"), console, quiet, clock=clock)
    ctx = StudyContext(spec, out, CellStudies(spec, cells, out / "optuna.journal"), view)
    holder["ctx"] = ctx
    return TrialSource(spec, cells, ctx.studies, ctx), ctx, view, console, clock


def _end(source: TrialSource, ctx: StudyContext, tid: str, value: float, wall: float = 3.0) -> None:
    rec = ctx.by_tune_id[tid]
    rec.payload = {"status": "completed", "best_value": value, "epoch_rows": [], "wall_s": wall}
    ctx.trial_ended(tid, {"objective": value})


def _text(renderable) -> str:
    c = Console(record=True, width=80, color_system=None, file=open("/dev/null", "w"))  # noqa: SIM115
    c.print(renderable)
    return c.export_text()


def _ls_trials(source: TrialSource, ctx: StudyContext) -> list[str]:
    """Ask until the three label-smoothing search trials of the "none" cell are out."""
    out, i = [], 0
    while len(out) < 3:
        tid = f"t{i}"
        i += 1
        assert source.suggest(tid)
        if ctx.by_tune_id[tid].cell_id.endswith("label_smoothing/none"):
            out.append(tid)
    return out


def test_table_best_follows_the_direction_and_fits_80_columns(tmp_path):
    source, ctx, view, console, clock = _setup(tmp_path, quiet=False)
    console.print(view.table())
    first = console.export_text()
    assert "ETA -" in first and "nan" not in first  # nothing ended yet: no ETA, not "nan"
    ls = _ls_trials(source, ctx)
    clock.now += 30
    for tid, v in zip(ls, (0.9, 0.4, 0.7), strict=True):
        for epoch in (1, 2):  # each epoch took 1.5 s
            ctx.epoch_result(tid, {"epoch": epoch, "objective": v, "val_nll": v, "wall_s": 1.5})
        _end(source, ctx, tid, v)
    console.print(view.table())
    text = console.export_text()
    assert "best: min val_nll" in text
    row = next(ln for ln in text.splitlines() if "s ls none" in ln)
    assert row.split()[-2] == "0.4000"  # the minimum, not the maximum 0.9
    assert re.search(r"│ s ls asym:0\.4 +│ +\d", text)  # short cell names
    assert all(len(ln) <= 80 for ln in text.splitlines())
    # 3 of 16 trials (2 ce + 6 ls search, 2 x 4 final) ended after 6 epochs of 1.5 s each. Left: the
    # asked trials still running (no epoch yet) and those not asked, 2 epochs each = 26 epochs x 1.5 s,
    # over the trials training at once (the ETA never divides elapsed time).
    running = sum(1 for r in ctx.by_tune_id.values() if r.ended_at is None)
    eta = round(26 * 1.5 / max(running, 1))
    shown = f"{eta // 60}m{eta % 60:02d}s" if eta >= 60 else f"{eta}s"
    assert f"3/16 trials ended, 6 epochs, 30s elapsed, ETA {shown}" in text, text


def test_the_clock_ticks_without_trial_events(tmp_path):
    _, _, view, console, clock = _setup(tmp_path, quiet=False)
    with view:
        assert view.live is not None and view.live.auto_refresh
        clock.now += 5
        before = _text(view.live.renderable)
        clock.now += 70
        after = _text(view.live.renderable)  # what the refresh thread draws next: no event in between
    assert "5s elapsed" in before and "1m15s elapsed" in after


def test_quiet_lines_carry_time_metric_and_post_progress(tmp_path):
    source, ctx, view, console, clock = _setup(tmp_path, quiet=True, width=200)
    ls = _ls_trials(source, ctx)
    clock.now += 65
    _end(source, ctx, ls[0], 0.4321, wall=12.0)
    rec = ctx.by_tune_id[ls[1]]
    rec.status, rec.epoch_rows = "pruned", [{"epoch": 1, "val_nll": 1.25}]
    ctx.trial_ended(ls[1])
    view.post_progress(0, 2)
    view.post_progress(1, 2, "distill", f"final|{ctx.by_tune_id[ls[0]].cell_id}|1")
    lines = console.export_text().splitlines()
    stamp = r"\d\d:\d\d:\d\d \+1m05s"
    assert re.fullmatch(rf"{stamp} search ls none #\d: completed val_nll=0\.4321 \(12s\)", lines[0]), lines
    assert re.fullmatch(rf"{stamp} search ls none #\d: pruned val_nll=1\.2500 \(\d+s\)", lines[1]), lines
    assert re.fullmatch(rf"{stamp} post phase: 2 jobs \(transfer attacks, distillation\)", lines[2])
    assert re.fullmatch(rf"{stamp} post 1/2 distill ls none #1: done", lines[3])


def test_startup_line_and_short_names():
    spec = parse_spec(SPEC)
    assert startup_line(spec) == ("study live: 4 cells, 8 search + 8 final trials, min val_nll; starting Ray")
    names = short_names(
        [
            "a/mlp/label_smoothing/adversarial-confident:0.2",
            "b/mlp/logit_penalty/none",
            "a/mlp/ce/symmetric:0.4",
        ]
    )
    # dataset kept (two of them), model dropped (one), initials collide (ls/lp do not): abbreviated.
    assert names == {
        "a/mlp/label_smoothing/adversarial-confident:0.2": "a ls adv-conf:0.2",
        "b/mlp/logit_penalty/none": "b lp none",
        "a/mlp/ce/symmetric:0.4": "a ce sym:0.4",
    }
    clash = short_names(["d/m/label_smoothing/none", "d/m/logit_scaling/none"])
    assert clash == {
        "d/m/label_smoothing/none": "label_smoothing none",
        "d/m/logit_scaling/none": "logit_scaling none",
    }


def test_manifest_status_follows_the_phases(tmp_path):
    spec = parse_spec(SPEC)
    out = tmp_path / "run"
    manifest = prepare_out_dir(spec, SPEC, out, resume=False)
    for status in ("search_done", "post", "completed"):
        set_status(out, manifest, status)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["status"] == "completed"
    assert [s for s, _ in on_disk["phases"]] == ["running", "search_done", "post", "completed"]
    assert {s for s, _ in on_disk["phases"]} <= set(MANIFEST_STATUSES)
    times = [t for _, t in on_disk["phases"]]
    assert times == sorted(times)
    resumed = prepare_out_dir(spec, SPEC, out, resume=True)
    assert resumed["status"] == "running" and resumed["phases"][-1][0] == "running"


def test_post_phase_shows_its_jobs_and_an_eta_from_their_pace(tmp_path):
    _, _, view, console, clock = _setup(tmp_path, quiet=False)
    view.post_progress(0, 10)
    console.print(view.table())
    assert "post 0/10 jobs, ETA -" in console.export_text()
    clock.now += 20  # 4 jobs in 20 s: 5 s each, 6 left
    view.post_progress(4, 10, "distill", "k|mnist1d/cnn1d/ce/none|1")
    console.print(view.table())
    assert "post 4/10 jobs, ETA 30s" in console.export_text()
