"""`study run`: results directory, manifest, both phases, Parquet tables, live progress."""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from study.spec import Cell, StudySpec, expand_cells, load_spec, spec_hash


class RunError(ValueError):
    """Bad input detected before any trial starts (exit code 2)."""


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("regstudy", "torch", "torchvision", "ray", "optuna", "pyarrow"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _git_sha() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def planned_counts(spec: StudySpec, cells: list[Cell]) -> dict[str, int]:
    from study.spec import grid_size

    search = 0
    for c in cells:
        n = spec.search.trials_per_cell
        if spec.search.sampler == "grid":
            n = min(n, max(grid_size(c), 1))
        search += n
    return {"search": search, "final": len(cells) * spec.final.seeds}


def check_out_dir(spec: StudySpec, out: Path, resume: bool) -> None:
    """Raise RunError if `out` holds another study, or this one without --resume (writes nothing)."""
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise RunError(f"{out}: manifest.json is unreadable; choose another --out") from None
        if old.get("spec_hash") != spec_hash(spec):
            raise RunError(
                f"{out}: holds a different study ({old.get('study')!r}, spec hash {old.get('spec_hash')}); "
                "choose another --out or delete it"
            )
        if not resume:
            raise RunError(f"{out}: study {spec.name!r} already exists here; pass --resume to continue it")
    elif resume and out.exists() and any(out.iterdir()):
        raise RunError(f"{out}: not a study results directory (no manifest.json); nothing to resume")


def prepare_out_dir(spec: StudySpec, spec_text: str, out: Path, resume: bool) -> dict[str, Any]:
    check_out_dir(spec, out, resume)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        old["status"] = "running"
        old["resumed_at"] = time.time()
        _write_json(manifest_path, old)
        return old
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(spec_text)
    cells = expand_cells(spec)
    manifest = {
        "study": spec.name,
        "spec_hash": spec_hash(spec),
        "status": "running",
        "started_at": time.time(),
        "ended_at": None,
        "planned": planned_counts(spec, cells),
        "cells": len(cells),
        "versions": _versions(),
        "git_sha": _git_sha(),
        "schema_version": None,
    }
    _write_json(manifest_path, manifest)
    return manifest


def _strength(regularizer: str, params: dict[str, Any]) -> tuple[str | None, float | None]:
    from study import regularizers

    try:
        info = regularizers.get_info(regularizer)
    except ValueError:
        return None, None
    name = info.strength
    if name is None:
        return None, None
    value = params.get(name, info.params[name].default)
    if isinstance(value, dict):
        value = value.get("start")
    try:
        return name, float(value)
    except (TypeError, ValueError):
        return name, None


def record_rows(spec: StudySpec, records: list[dict[str, Any]]) -> tuple[list, list, list]:
    """Records -> rows of trials, epochs and evals (design.md's results contract)."""
    cells = {c.cell_id: c for c in expand_cells(spec)}
    trials, epochs, evals = [], [], []
    for rec in records:
        cell = cells.get(rec["cell_id"])
        if cell is None:
            continue
        cfg = rec["config"]
        payload = rec.get("payload") or {}
        values = {"lr": cfg["lr"], "weight_decay": cfg["weight_decay"], **cfg["reg_params"]}
        strength_param, strength = _strength(cell.regularizer, cfg["reg_params"])
        row = {
            "study": spec.name,
            "phase": rec["phase"],
            "cell_id": rec["cell_id"],
            "trial_id": rec["trial_id"],
            "dataset": cell.dataset,
            "model": cell.model,
            "regularizer": cell.regularizer,
            "strength_param": strength_param,
            "strength": strength,
            "noise_kind": cell.noise_kind,
            "noise_rate": cell.noise_rate,
            "noise_mode": cell.noise_mode,
            "noise_setting": cell.noise_setting,
            "realized_noise_rate": payload.get("realized_noise_rate"),
            "noise_seed": cfg["noise_seed"],
            "seed": cfg["seed"],
            "status": rec["status"],
            "epochs": len(rec.get("epoch_rows") or []),
            "max_epochs": cfg["epochs"],
            "best_value": payload.get("best_value") if payload else _best(rec, spec),
            "best_epoch": payload.get("best_epoch"),
            "metric": spec.search.metric,
            "direction": spec.search.direction,
            "wall_s": payload.get("wall_s")
            or ((rec.get("ended_at") or rec["started_at"]) - rec["started_at"]),
            "device": payload.get("device") or rec.get("device"),
            "node": payload.get("node") or rec.get("node"),
            "error": rec.get("error"),
            "started_at": rec["started_at"],
            "ended_at": rec.get("ended_at"),
            "optuna_number": rec.get("optuna_number"),
        }
        for k, v in values.items():
            row[f"param_{k}"] = json.dumps(v) if isinstance(v, dict) else v
        trials.append(row)
        for e in rec.get("epoch_rows") or []:
            epochs.append({"trial_id": rec["trial_id"], **e})
        for ev in payload.get("eval_rows") or []:
            evals.append({"trial_id": rec["trial_id"], **ev})
    return trials, epochs, evals


def _best(rec: dict[str, Any], spec: StudySpec) -> float | None:
    vals = [
        r[spec.search.metric] for r in rec.get("epoch_rows") or [] if r.get(spec.search.metric) is not None
    ]
    if not vals:
        return None
    return max(vals) if spec.search.direction == "maximize" else min(vals)


def write_tables(spec: StudySpec, out: Path) -> None:
    from reports.build import write_results
    from study.sweep.tune import Records

    recs = Records(out / "records")
    records = list(recs.load_all("search").values()) + list(recs.load_all("final").values())
    trials, epochs, evals = record_rows(spec, records)
    write_results(out, trials=trials, epochs=epochs, evals=evals)
    projections = [
        {"trial_id": rec["trial_id"], **row}
        for rec in records
        for row in (rec.get("payload") or {}).get("projection") or []
    ]
    if projections:
        import pandas as pd

        tmp = out / "projections.parquet.tmp"
        pd.DataFrame(projections).to_parquet(tmp, index=False)
        tmp.replace(out / "projections.parquet")


class LiveView:
    """Per-cell progress (running / completed / pruned / failed, best so far, ETA), throttled."""

    def __init__(self, spec: StudySpec, ctx_getter: Any, console: Console, quiet: bool) -> None:
        self.spec, self.ctx_getter, self.console, self.quiet = spec, ctx_getter, console, quiet
        self.live: Live | None = None
        self.last = 0.0
        self.t0 = time.time()
        self.seen_done: set[str] = set()
        self.planned = planned_counts(spec, expand_cells(spec))

    def __enter__(self) -> LiveView:
        if not self.quiet:
            self.live = Live(console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self.table())
            self.live.__exit__(*exc)

    def __call__(self) -> None:
        ctx = self.ctx_getter()
        if ctx is None:
            return
        if self.quiet:
            for rec in ctx.by_tune_id.values():
                if rec.ended_at is not None and rec.key not in self.seen_done:
                    self.seen_done.add(rec.key)
                    self.console.print(
                        f"{rec.phase} {rec.cell_id} #{rec.index}: {rec.status}", highlight=False
                    )
            return
        now = time.time()
        if self.live is not None and now - self.last > 0.5:
            self.last = now
            self.live.update(self.table())

    def table(self) -> Table:
        ctx = self.ctx_getter()
        t = Table(title=f"{self.spec.name}", expand=False)
        for col in ("phase/cell", "run", "done", "pruned", "fail", "best"):
            t.add_column(col, overflow="fold")
        if ctx is None:
            return t
        by_cell: dict[tuple[str, str], Counter] = {}
        best: dict[tuple[str, str], float] = {}
        for rec in ctx.by_tune_id.values():
            k = (rec.phase, rec.cell_id)
            by_cell.setdefault(k, Counter())[rec.status] += 1
            if rec.payload and rec.payload.get("best_value") is not None:
                v = rec.payload["best_value"]
                best[k] = max(best.get(k, v), v)
        done = sum(1 for r in ctx.by_tune_id.values() if r.ended_at is not None)
        total = self.planned["search"] + self.planned["final"]
        for (phase, cell_id), c in sorted(by_cell.items(), key=lambda kv: (kv[0][0] != "search", kv[0][1])):
            b = best.get((phase, cell_id))
            t.add_row(
                f"{phase[0]} {cell_id}",
                str(c["running"]),
                str(c["completed"]),
                str(c["pruned"]),
                str(c["failed"] + c["diverged"]),
                f"{b:.3f}" if b is not None else "-",
            )
        elapsed = time.time() - self.t0
        eta = elapsed / done * (total - done) if done else float("nan")
        t.caption = f"{done}/{total} trials ended, {elapsed:.0f}s elapsed, ETA {eta:.0f}s"
        return t


def sync(remote: tuple[Any, str] | None, out_dir: Path, *, light: bool = False) -> None:
    """Mirror the results directory to --storage (no-op without one); `light`: journal and records
    only (after every trial, so a study killed mid-phase resumes from the storage without re-runs)."""
    if remote is not None:
        from study.sweep.storage import upload

        upload(remote[0], remote[1], out_dir, light=light)


def run_study(
    spec_path: str | Path,
    *,
    out: str | Path | None = None,
    address: str | None = None,
    resume: bool = False,
    max_concurrent: int | None = None,
    quiet: bool = False,
    console: Console | None = None,
    storage: str | None = None,
) -> Path:
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    # Absolute: Ray Tune takes the storage path as a URI and refuses a relative one.
    out_dir = (Path(out) if out else Path("results") / spec.name).resolve()
    from study.sweep import tune as tune_lib

    if address not in (None, "local"):
        problem = tune_lib.check_address(address)
        if problem:
            raise RunError(problem)
    remote = None
    if storage:
        from study.sweep import storage as storage_lib

        try:
            fs, base = storage_lib.open_storage(storage)
            remote = (fs, f"{base}/{spec.name}")
            storage_lib.check_writable(fs, remote[1], storage)
        except storage_lib.StorageError as exc:
            raise RunError(str(exc)) from None
        if resume and not (out_dir / "manifest.json").exists():
            storage_lib.download(fs, remote[1], out_dir)
    check_out_dir(spec, out_dir, resume)  # refuse a foreign or existing study before starting Ray
    try:
        handle = tune_lib.init_ray(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"--address {address or 'local'}: cannot start or join Ray ({first})") from None
    try:
        manifest = prepare_out_dir(spec, spec_path.read_text(), out_dir, resume)
    except BaseException:
        tune_lib.shutdown(handle)
        raise
    sync(remote, out_dir)
    console = console or Console()
    holder: dict[str, Any] = {"ctx": None}
    status = "failed"
    try:
        slots = max_concurrent or tune_lib.cluster_slots(spec, handle)
        studies = tune_lib.CellStudies(spec, expand_cells(spec), out_dir / "optuna.journal")
        with LiveView(spec, lambda: holder["ctx"], console, quiet) as view:
            ctx = tune_lib.StudyContext(spec, out_dir, studies, view)
            holder["ctx"] = ctx
            if remote:
                ctx.tune_storage = (f"{remote[1]}/ray", remote[0])
                ctx.after_trial = lambda: sync(remote, out_dir, light=True)

            def search_done() -> None:
                write_tables(spec, out_dir)
                manifest["status"] = "search_done"
                _write_json(out_dir / "manifest.json", manifest)
                sync(remote, out_dir)

            tune_lib.run_trials(spec, out_dir, ctx, slots, on_search_done=search_done)
            tune_lib.run_post_phase(spec, ctx, slots)
        write_tables(spec, out_dir)
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        tune_lib.shutdown(handle)
        # The tables are rebuilt on resume: never mask the real error with a failure here.
        with contextlib.suppress(Exception):
            write_tables(spec, out_dir)
        manifest["status"] = status
        manifest["ended_at"] = time.time()
        from reports.build import SCHEMA_VERSION

        manifest["schema_version"] = SCHEMA_VERSION
        ctx = holder["ctx"]
        if ctx is not None and ctx.notes:
            manifest["notes"] = sorted(set(manifest.get("notes", [])) | set(ctx.notes))
            for note in ctx.notes:
                console.print(f"study: {note}", highlight=False)
        _write_json(out_dir / "manifest.json", manifest)
        sync(remote, out_dir)
    return out_dir


def sync_storage(uri: str, out_dir: Path) -> None:
    """Mirror a finished results directory (report and plots included) to --storage."""
    from study.sweep.storage import open_storage, upload

    spec = load_spec(out_dir / "spec.yaml")
    fs, base = open_storage(uri)
    upload(fs, f"{base}/{spec.name}", out_dir)
