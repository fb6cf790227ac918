"""`study run`: results directory, manifest, both phases, Parquet tables, live progress."""

from __future__ import annotations

import contextlib
import errno
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from study.spec import (
    StudySpec,
    check_data,
    check_local_resources,
    load_spec,
    parse_spec,
    spec_hash,
    with_seed,
)
from study.sweep.cells import expand_cells, planned_counts
from study.sweep.context import StudyContext
from study.sweep.interrupts import CtrlC
from study.sweep.live import LiveView, startup_line
from study.sweep.lock import LockedError, ResultsLock
from study.sweep.optuna_cells import CellStudies, repair_journal
from study.sweep.provenance import git_state, versions
from study.sweep.records import Records, check_phases, write_tables
from study.sweep.trackers import check_tracking
from study.vocabulary import LOCK_FILE, LOCK_OWNER_FILE

if TYPE_CHECKING:
    from study.sweep.seeds import SeedPlan


class RunError(ValueError):
    """Bad input detected before any trial starts (exit code 2)."""


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=str)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.exists():
            raise
        # A full disk: rewrite the file in place, in the blocks it already has (a status change
        # grows a manifest by a few bytes), so that it still says how the run ended.
        tmp.unlink(missing_ok=True)
        with path.open("r+b") as f:
            f.write(text.encode())
            f.truncate()


def check_out_dir(spec: StudySpec, out: Path, resume: bool) -> None:
    """Raise RunError if `out` holds another study, or this one without --resume (writes nothing)."""
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise RunError(f"{out}: manifest.json is unreadable; choose another --out") from None
        if old.get("spec_hash") != spec_hash(spec):
            was, now = old.get("seed", 0), spec.seed
            other_seed = f"; it ran with study seed {was}, this run has {now}" if was != now else ""
            raise RunError(
                f"{out}: holds a different study ({old.get('study')!r}, spec hash {old.get('spec_hash')}"
                f"{other_seed}); choose another --out or delete it"
            )
        if not resume:
            raise RunError(f"{out}: study {spec.name!r} already exists here; pass --resume to continue it")
    elif resume and out.exists() and any(p.name not in (LOCK_FILE, LOCK_OWNER_FILE) for p in out.iterdir()):
        raise RunError(f"{out}: not a study results directory (no manifest.json); nothing to resume")


def prepare_out_dir(spec: StudySpec, spec_text: str, out: Path, resume: bool) -> dict[str, Any]:
    check_out_dir(spec, out, resume)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        old["resumed_at"] = time.time()
        set_status(out, old, "running")
        return old
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(spec_text)
    cells = expand_cells(spec)
    manifest = {
        "study": spec.name,
        "spec_hash": spec_hash(spec),
        "seed": spec.seed,
        "status": "running",
        "started_at": time.time(),
        "ended_at": None,
        "phases": [],
        "planned": planned_counts(spec, cells),
        "cells": len(cells),
        "versions": versions(),
        **git_state(),
        "schema_version": None,
    }
    set_status(out, manifest, "running")
    return manifest


def set_status(out_dir: Path, manifest: dict[str, Any], status: str) -> None:
    """The manifest follows the phases (running -> search_done -> post -> completed, or interrupted /
    failed); ``phases`` lists [status, time] as each was entered (a resumed run appends to it)."""
    manifest["status"] = status
    manifest.setdefault("phases", []).append([status, time.time()])
    _write_json(out_dir / "manifest.json", manifest)


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
    seed: int | None = None,
) -> Path:
    """Run a study: check everything that can be wrong before Ray starts, then both phases in one
    Tuner, the post phase and the tables; the manifest says how it ended (also when interrupted).

    The results directory is locked for the whole run (one writer: study/sweep/lock.py). `resume` on a
    study that has completed runs nothing: it says so, rebuilds damaged tables and returns. `seed`
    replaces the spec's study seed (the stored spec.yaml says so).
    """
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    spec_text = spec_path.read_text()
    if seed is not None and seed != spec.seed:
        spec_text = with_seed(spec_text, seed)
        spec = parse_spec(spec_text, source=str(spec_path))
    if address in (None, "local"):  # a local Ray gets this machine's CPUs/GPUs: more never schedules
        check_local_resources(spec, str(spec_path))
        # The loader's and builders' rules, before Ray (a cluster's data may live on its workers only).
        check_data(spec, str(spec_path), download=True)
    # Absolute: Ray Tune takes the storage path as a URI and refuses a relative one.
    out_dir = (Path(out) if out else Path("results") / spec.name).resolve()
    console = console or Console()
    created = not out_dir.exists()
    lock = ResultsLock(out_dir)
    try:
        lock.acquire()
    except LockedError as exc:
        raise RunError(str(exc)) from None
    except OSError as exc:
        raise RunError(f"{out_dir}: cannot write the results directory ({exc.strerror or exc})") from None
    try:
        remote = _preflight(spec, out_dir, address=address, resume=resume, storage=storage)
        console.print(startup_line(spec), highlight=False)  # at once: Ray's start takes seconds
        if resume and _manifest_status(out_dir) == "completed":
            fixed = repair_tables(spec, out_dir, rebuild=True)
            console.print(
                f"study: {spec.name!r} in {out_dir} has already completed; nothing to resume"
                + (f" (rebuilt damaged {', '.join(fixed)})" if fixed else ""),
                highlight=False,
            )
            return out_dir
        if resume:
            repair_tables(spec, out_dir, rebuild=False)
        _run(spec, spec_text, out_dir, address, resume, max_concurrent, quiet, console, remote)
    except RunError:
        lock.release()
        if created:  # bad input writes nothing: not even the directory the lock needed
            with contextlib.suppress(OSError):
                (out_dir / LOCK_FILE).unlink(missing_ok=True)  # filelock leaves the file behind
                out_dir.rmdir()
        raise
    finally:
        lock.release()
    return out_dir


def _run(
    spec: StudySpec,
    spec_text: str,
    out_dir: Path,
    address: str | None,
    resume: bool,
    max_concurrent: int | None,
    quiet: bool,
    console: Console,
    remote: tuple[Any, str] | None,
) -> None:
    from reports.build import build_summary
    from study.sweep import tune as tune_lib
    from study.sweep.source import TrialSource

    try:
        handle = tune_lib.init_ray(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"--address {address or 'local'}: cannot start or join Ray ({first})") from None
    try:
        manifest = prepare_out_dir(spec, spec_text, out_dir, resume)
        note = repair_journal(out_dir / "optuna.journal")
        damaged = Records(out_dir / "records").repair()
    except BaseException:
        tune_lib.shutdown(handle)
        raise
    sync(remote, out_dir)
    ctx: StudyContext | None = None
    source: TrialSource | None = None
    status = "failed"
    ctrl_c = CtrlC()
    try:
        slots = max_concurrent or tune_lib.cluster_slots(spec, handle)
        studies = CellStudies(spec, expand_cells(spec), out_dir / "optuna.journal")
        # The view reads the context, which tells the view of progress: the view is attached once both exist.
        ctx = StudyContext(spec, out_dir, studies, on_progress=lambda: None)
        ctx.notes.extend([note] if note else [])
        ctx.notes.extend(damaged)
        with LiveView(spec, lambda: ctx, console, quiet) as view:
            ctx.on_progress = view
            if remote:
                ctx.tune_storage = (f"{remote[1]}/ray", remote[0])
                ctx.after_trial = lambda: sync(remote, out_dir, light=True)

            def search_done() -> None:
                write_tables(spec, out_dir)
                set_status(out_dir, manifest, "search_done")
                sync(remote, out_dir)

            def post_started(jobs: int) -> None:
                set_status(out_dir, manifest, "post")
                view.post_progress(0, jobs)

            source = TrialSource(spec, list(ctx.cells.values()), studies, ctx, on_search_done=search_done)
            tune_lib.run_trials(spec, out_dir, ctx, source, slots)
            check_phases(out_dir)
            tune_lib.run_post_phase(spec, ctx, slots, on_start=post_started, on_progress=view.post_progress)
        write_tables(spec, out_dir)
        build_summary(out_dir)  # every reference and pair, once: `study report` only reads
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException as exc:
        if not ctrl_c.seen:
            raise
        # Ctrl-C landed inside a library's cleanup (e.g. Optuna's journal lock release), which raised
        # its own error instead, and Tune wrapped it: still an interrupted study (exit 130, --resume).
        status = "interrupted"
        raise KeyboardInterrupt from exc
    finally:
        ctrl_c.restore()
        tune_lib.shutdown(handle)
        if ctx is not None:
            ctx.remove_search_checkpoints()  # those whose trial ended while a worker wrote
            ctx.trackers.close()
        _finish(spec, out_dir, manifest, status, ctx, source.seeds if source else None, console, remote)


def _manifest_status(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / "manifest.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def repair_tables(spec: StudySpec, out_dir: Path, *, rebuild: bool) -> list[str]:
    """Remove Parquet tables that fail to read (all are derived: the tables from the records, the
    summary from the tables); with `rebuild`, write them again now. Returns the damaged files' names."""
    from reports.build import TABLES, ResultsError, build_summary, check_parquet

    damaged = []
    for name in TABLES:
        path = out_dir / f"{name}.parquet"
        try:
            if path.exists():
                check_parquet(path)
        except (ResultsError, OSError):
            path.unlink()
            damaged.append(path.name)
    if damaged and rebuild:
        write_tables(spec, out_dir)
        if "summary.parquet" in damaged:
            build_summary(out_dir)
    return damaged


def _preflight(
    spec: StudySpec, out_dir: Path, *, address: str | None, resume: bool, storage: str | None
) -> tuple[Any, str] | None:
    """Every check that needs no Ray (address reachable, storage writable, results dir usable): RunError
    before anything starts. Returns the --storage (filesystem, base path), downloaded on --resume."""
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
        except storage_lib.StorageError as exc:
            raise RunError(str(exc)) from None
        if resume and not (out_dir / "manifest.json").exists():
            storage_lib.download(fs, remote[1], out_dir)
    check_out_dir(spec, out_dir, resume)  # refuse a foreign or existing study before starting Ray
    check_given_labels(spec)
    check_extras(spec)
    if problem := check_tracking(spec, out_dir):
        raise RunError(problem)
    if remote is not None:  # last: a refused run writes nothing there either
        try:
            storage_lib.check_writable(remote[0], remote[1], storage)
        except storage_lib.StorageError as exc:
            raise RunError(str(exc)) from None
    return remote


# The module each tracker of the spec's `tracking` block needs, and the regstudy extra installing it.
TRACKER_EXTRAS = {"tensorboard": ("tensorboardX", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
                  "wandb": ("wandb", "wandb")}  # fmt: skip


def check_extras(spec: StudySpec) -> None:
    """RunError naming the extra to install when the spec needs an optional package that is missing:
    a tracker of ``tracking``, or scikit-learn for the ``digits`` dataset."""
    import importlib.util

    if spec.dataset.name == "digits" and importlib.util.find_spec("sklearn") is None:
        raise RunError(
            'dataset.name: digits needs scikit-learn; install it with pip install "regstudy[digits]"'
        )
    t = spec.tracking
    asked = {"tensorboard": t.tensorboard, "mlflow": t.mlflow is not None, "wandb": t.wandb is not None}
    for tracker, on in asked.items():
        module, extra = TRACKER_EXTRAS[tracker]
        if on and importlib.util.find_spec(module) is None:
            raise RunError(
                f'tracking.{tracker}: needs {module}; install it with pip install "regstudy[{extra}]"'
            )


def check_given_labels(spec: StudySpec) -> None:
    """Read every given-label setting (human, file) once against the dataset: a missing or malformed
    label file is a RunError naming the file and the expected shape, before any trial runs."""
    from study import data as data_lib
    from study import noise as noise_lib
    from study.trial.run import given_labels

    settings = [
        s for ns in spec.noise for s in ns.settings() if not noise_lib.NOISE_REGISTRY[s.kind].uses_rate
    ]
    if not settings:
        return
    d = spec.dataset
    try:
        bundle = data_lib.load_dataset(d.name, root=d.root, download=d.download, **d.options)
        for setting in settings:
            given_labels(setting, d, bundle)
    except (noise_lib.LabelFileError, FileNotFoundError, ValueError) as exc:
        raise RunError(str(exc).splitlines()[0]) from None


def _finish(
    spec: StudySpec,
    out_dir: Path,
    manifest: dict[str, Any],
    status: str,
    ctx: StudyContext | None,
    seeds: SeedPlan | None,
    console: Console,
    remote: tuple[Any, str] | None,
) -> None:
    """Tables, manifest (status, end time, schema version, notes) and the storage mirror, whatever
    ended the run."""
    from reports.build import SCHEMA_VERSION

    if status != "completed":  # a completed run wrote them after its last phase, before Ray's shutdown
        # The tables are rebuilt on resume: never mask the real error with a failure here.
        with contextlib.suppress(Exception):
            write_tables(spec, out_dir)
    manifest["ended_at"] = time.time()
    manifest["status"] = status
    manifest.setdefault("phases", []).append([status, manifest["ended_at"]])
    manifest["schema_version"] = SCHEMA_VERSION
    if seeds is not None and seeds.adaptive is not None:
        manifest["final_seeds"] = seeds.record()
    if ctx is not None and ctx.notes:
        manifest["notes"] = sorted(set(manifest.get("notes", [])) | set(ctx.notes))
        for note in ctx.notes:
            console.print(f"study: {note}", highlight=False)
    _write_json(out_dir / "manifest.json", manifest)
    sync(remote, out_dir)


def sync_storage(uri: str, out_dir: Path) -> None:
    """Mirror a finished results directory (report and plots included) to --storage."""
    from study.sweep.storage import open_storage, upload

    spec = load_spec(out_dir / "spec.yaml")
    fs, base = open_storage(uri)
    upload(fs, f"{base}/{spec.name}", out_dir)
