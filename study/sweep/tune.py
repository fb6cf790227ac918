"""Ray Tune execution of a study. THE ONLY MODULE THAT IMPORTS ray.

One Tuner runs both phases. Its Searcher asks each cell's Optuna study for the next configuration
(spreading trials across cells so all progress together) and, once a cell's search has ended, hands out
that cell's final trials: its best configuration retrained over seeds with full evaluation. Final trials
thus fill the slots that the search's last trials leave idle, and the worker processes (each with torch
imported and the dataset loaded) serve both phases. The TrialScheduler reports every epoch's validation
value to the cell's study and asks its pruner; pruned trials are told to Optuna as PRUNED (Ray's own
OptunaSearch would store them as COMPLETE with a partial-budget value).

Resume: the Optuna journal and the per-trial records under `records/` are the source of truth. A
resumed run re-issues trials the killed driver left RUNNING (same Optuna trial, same checkpoint dir, so
they continue from their last epoch) and asks only the remaining budget: nothing completed is re-run and
nothing is duplicated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Tune's own CSV/JSON/TensorBoard loggers would duplicate what we store (and slow every report down).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
# Tune's own SIGINT handler stops the experiment and returns normally, which would let the driver go
# on to the next phase; without it, Ctrl-C raises KeyboardInterrupt and the study stops (--resume).
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import ray  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune import Callback  # noqa: E402
from ray.tune.schedulers import FIFOScheduler, TrialScheduler  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from study.spec import Cell, StudySpec, expand_cells  # noqa: E402
from study.sweep.optuna_cells import CellStudies  # noqa: E402

TRAIN_FIELDS = ("lr", "weight_decay")


class DriverOnly:
    """Driver-side state that Tune pickles with the Tuner (for Tuner.restore) but never needs back:
    it holds locks, open files and the live view, so it pickles as an empty shell."""

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def trial_key(phase: str, cell_id: str, index: int) -> str:
    return f"{phase}|{cell_id}|{index}"


def trial_id_for(study: str, key: str) -> str:
    return hashlib.sha1(f"{study}|{key}".encode()).hexdigest()[:12]


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def base_trial_config(
    spec: StudySpec, cell: Cell, params: dict[str, Any], *, seed: int, phase: str, checkpoint_dir: str
) -> dict[str, Any]:
    """The TrialConfig dict of one trial: the cell, the fixed and sampled values, the phase's settings."""
    values = {**cell.fixed, **params}
    reg_params = {k: v for k, v in values.items() if k not in TRAIN_FIELDS}
    t = spec.train
    final = phase == "final"
    return {
        "dataset": spec.dataset.name,
        "dataset_root": spec.dataset.root,
        "download": spec.dataset.download,
        "dataset_options": dict(spec.dataset.options),
        "val_fraction": spec.dataset.val_fraction,
        "clean_validation": spec.dataset.clean_validation,
        "model": cell.model,
        "model_options": dict(cell.model_options),
        "regularizer": cell.regularizer,
        "reg_params": reg_params,
        "noise_kind": cell.noise_kind,
        "noise_rate": cell.noise_rate,
        "noise_mode": cell.noise_mode,
        "noise_seed": spec.noise_seed + (seed if final else 0),
        "seed": seed,
        "epochs": (spec.final.epochs or t.epochs) if final else t.epochs,
        "batch_size": t.batch_size,
        "optimizer": t.optimizer,
        "lr": float(values["lr"]),
        "weight_decay": float(values["weight_decay"]),
        "momentum": t.momentum,
        "schedule": t.schedule,
        "milestones": list(t.milestones),
        "gamma": t.gamma,
        "warmup_epochs": t.warmup_epochs,
        "augment": t.augment,
        "device": t.device,
        "precision": t.precision,
        "metric": spec.search.metric,
        "checkpoint_dir": checkpoint_dir,
        "full_eval": final,
        "evaluate": spec.evaluate.model_dump(mode="json") if final else {},
        "save_model": final,
    }


def _trainable(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: one dict in, a typed TrialConfig on the first line."""
    from study.trial.fit import TrialConfig, resolve_device, run_trial

    cfg = TrialConfig(**config["trial"])
    started_at = time.time()

    node = ray.util.get_node_ip_address()
    device = str(resolve_device(cfg.device))

    def report(row: dict[str, Any]) -> bool:
        tune.report({**row, "objective": row[cfg.metric], "node": node, "device": device})
        return False

    result = run_trial(cfg, report)
    payload = {
        "status": result.status,
        "epochs_run": result.epochs_run,
        "best_value": result.best_value,
        "best_epoch": result.best_epoch,
        "realized_noise_rate": result.realized_noise_rate,
        "noise_note": result.noise_note,
        "wall_s": result.wall_s,
        "device": result.device,
        "node": node,
        "started_at": started_at,
        "eval_rows": result.eval_rows,
        "projection": result.projection,
        "epoch_rows": result.epoch_rows,
    }
    tune.report(
        {
            "final": json.dumps(payload),
            "objective": result.best_value if result.best_value is not None else float("nan"),
        }
    )


@dataclass
class TrialRecord:
    """What the driver knows of one trial; written to records/<phase>/<key>.json when it ends."""

    key: str
    trial_id: str
    phase: str
    cell_id: str
    index: int
    config: dict[str, Any]
    params: dict[str, Any]
    optuna_number: int | None = None
    optuna_id: int | None = None
    status: str = "running"
    epoch_rows: list[dict[str, Any]] = field(default_factory=list)
    payload: dict[str, Any] | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    node: str | None = None
    device: str | None = None

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


class Records:
    """Per-trial JSON records in the results dir: the driver's durable memory across kills."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, phase: str, key: str) -> Path:
        return self.root / phase / f"{_safe(key)}.json"

    def save(self, rec: TrialRecord) -> None:
        self.save_dict(rec.to_json())

    def save_dict(self, rec: dict[str, Any]) -> None:
        path = self.path(rec["phase"], rec["key"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, default=str))
        os.replace(tmp, path)

    def load_all(self, phase: str) -> dict[str, dict[str, Any]]:
        out = {}
        for p in sorted((self.root / phase).glob("*.json")):
            rec = json.loads(p.read_text())
            out[rec["key"]] = rec
        return out


class CellSearcher(Searcher):
    """Search trials from each cell's Optuna study (fewest asked first) until every cell has its budget;
    then, cell by cell as each one's search ends, that cell's final trials."""

    def __init__(
        self,
        spec: StudySpec,
        cells: list[Cell],
        studies: CellStudies,
        ctx: StudyContext,
        on_search_done: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(metric="objective", mode="max" if spec.search.direction == "maximize" else "min")
        self.spec, self.cells, self.studies, self.ctx = spec, cells, studies, ctx
        self.on_search_done = on_search_done
        self.orphans: list[tuple[Cell, Any]] = []
        recorded = ctx.records.load_all("search")
        for cell in cells:
            for frozen in studies.trials(cell.cell_id, (TrialState.RUNNING, TrialState.WAITING)):
                rec = recorded.get(trial_key("search", cell.cell_id, frozen.number))
                if rec is not None and rec["status"] != "running":
                    # The driver died between writing the record and telling Optuna: tell it now
                    # instead of running the trial again.
                    studies.tell_recorded(cell.cell_id, frozen, rec)
                else:
                    self.orphans.append((cell, frozen))
        self.final_done = {
            k for k, r in ctx.records.load_all("final").items() if r["status"] in FINAL_DONE_STATUSES
        }
        self.search_ended: set[str] = set()  # cells whose search trials have all ended
        self.final_queue: list[tuple[Cell, dict[str, Any], int]] = []

    def remaining(self) -> int:
        """Trials still to run: the search budget not yet ended plus final trials not yet done."""
        search = sum(
            max(self.studies.budget(c) - len(self.studies.trials(c.cell_id, _DONE)), 0) for c in self.cells
        )
        final = sum(
            trial_key("final", c.cell_id, seed) not in self.final_done
            for c in self.cells
            for seed in final_seeds(self.spec)
        )
        return search + final

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.orphans:
            cell, frozen = self.orphans.pop(0)
            return self.ctx.new_search_trial(trial_id, cell, self.studies.reattach(cell.cell_id, frozen))
        # One journal read per cell and suggestion (each read syncs with the journal file).
        asked = {c.cell_id: len(self.studies.trials(c.cell_id)) for c in self.cells}
        open_cells = [c for c in self.cells if asked[c.cell_id] < self.studies.budget(c)]
        if open_cells:
            cell = min(open_cells, key=lambda c: asked[c.cell_id])
            return self.ctx.new_search_trial(trial_id, cell, self.studies.ask(cell))
        self.queue_finals()
        if self.final_queue:
            cell, params, seed = self.final_queue.pop(0)
            return self.ctx.new_final_trial(trial_id, cell, params, seed)
        if len(self.search_ended) == len(self.cells):
            return Searcher.FINISHED
        return None  # the last search trials of some cells are still running: ask again later

    def queue_finals(self) -> None:
        """Queue the final trials of every cell whose search has just ended (all its trials told); tell
        on_search_done when the last cell's search ends (each cell enters search_ended once)."""
        ended_before = len(self.search_ended)
        for cell in self.cells:
            if cell.cell_id in self.search_ended:
                continue
            if len(self.studies.trials(cell.cell_id, _DONE)) < self.studies.budget(cell):
                continue
            self.search_ended.add(cell.cell_id)
            params, _ = self.studies.best_params(cell)
            if not params and cell.searched:
                # Every search trial was pruned or failed: there is no configuration to retrain.
                states = [t.state for t in self.studies.trials(cell.cell_id)]
                self.ctx.notes.append(
                    f"{cell.cell_id}: no search trial completed ({states.count(TrialState.PRUNED)} pruned, "
                    f"{states.count(TrialState.FAIL)} failed or diverged), so it has no final trials"
                )
                continue
            for seed in final_seeds(self.spec):
                if trial_key("final", cell.cell_id, seed) not in self.final_done:
                    self.final_queue.append((cell, params, seed))
        if len(self.search_ended) == len(self.cells) > ended_before:
            self.on_search_done()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.ctx.search_trial_ended(trial_id, result, error)

    # The Optuna journal is our durable searcher state; pickling the study objects is not needed.
    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        return None

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        return None


_DONE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
FINAL_DONE_STATUSES = ("completed", "diverged", "failed")


def final_seeds(spec: StudySpec) -> range:
    # Final seeds start at 1: seed 0 trained the search trials, and re-using it would carry the
    # selection's luck (winner's curse) into the final estimate.
    return range(1, spec.final.seeds + 1)


class OptunaPruningScheduler(FIFOScheduler):
    """Reports every epoch to the cell's Optuna study and stops the trial when its pruner says so."""

    def __init__(self, ctx: StudyContext) -> None:
        super().__init__()
        self.ctx = ctx
        self._supports_buffered_results = False

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if "final" in result or "epoch" not in result:
            return TrialScheduler.CONTINUE
        return (
            TrialScheduler.STOP if self.ctx.epoch_result(trial.trial_id, result) else TrialScheduler.CONTINUE
        )


class Collector(Callback):
    """Collects epoch rows and final payloads in the driver and keeps the live view up to date."""

    def __init__(self, ctx: StudyContext) -> None:
        self.ctx = ctx

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        rec = self.ctx.by_tune_id.get(trial.trial_id)
        if rec is None:
            return
        if "final" in result:
            rec.payload = json.loads(result["final"])
        elif "epoch" in result:
            StudyContext.add_epoch_row(rec, result)
        self.ctx.progress()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ctx.finish(trial.trial_id, error=None)
        self.ctx.after_trial()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ctx.finish(trial.trial_id, error=_error_text(trial))
        self.ctx.after_trial()


EPOCH_KEYS = {"epoch", "lr", "train_loss", "train_acc", "val_accuracy", "val_nll", "val_ece", "wall_s"}


def _error_text(trial: Any) -> str:
    """The exception line of a failed trial's traceback (e.g. "RuntimeError: boom")."""
    texts = []
    with contextlib.suppress(Exception):  # best effort: the error file may be missing or unreadable
        # The local copy first: the one in the storage path is uploaded asynchronously.
        if trial.error_file and Path(trial.error_file).exists():
            texts.append(Path(trial.error_file).read_text())
    with contextlib.suppress(Exception):
        err = trial.get_error()
        if err is not None:
            texts.append(str(err))
    for text in texts:
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        exc_lines = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*", ln)]
        if exc_lines or lines:
            return (exc_lines or lines)[-1]
    return "trial failed (see Ray logs)"


class StudyContext(DriverOnly):
    """Driver-side state of a run: records, Optuna studies and the live view."""

    def __init__(
        self, spec: StudySpec, out: Path, studies: CellStudies | None, on_progress: Callable[[], None]
    ):
        self.spec, self.out, self.studies = spec, out, studies
        self.records = Records(out / "records")
        self.by_tune_id: dict[str, TrialRecord] = {}
        self.on_progress = on_progress
        self.cells = {c.cell_id: c for c in expand_cells(spec)}
        # (path, pyarrow filesystem) for Tune's own experiment state when --storage is given.
        self.tune_storage: tuple[str, Any] | None = None
        # Called after each trial has been recorded and told to Optuna (runner mirrors to --storage).
        self.after_trial: Callable[[], None] = lambda: None
        # One line per thing the user should know that is not an error (e.g. a cell with no finals).
        self.notes: list[str] = []

    def progress(self) -> None:
        self.on_progress()

    def _checkpoint_dir(self, key: str) -> str:
        return str(self.out / "checkpoints" / _safe(key))

    def new_search_trial(self, tune_id: str, cell: Cell, trial: Any) -> dict[str, Any]:
        key = trial_key("search", cell.cell_id, trial.number)
        params = dict(trial.params)
        config = base_trial_config(
            self.spec,
            cell,
            params,
            seed=self.spec.search.seed,
            phase="search",
            checkpoint_dir=self._checkpoint_dir(key),
        )
        rec = TrialRecord(
            key=key,
            trial_id=trial_id_for(self.spec.name, key),
            phase="search",
            cell_id=cell.cell_id,
            index=trial.number,
            config=config,
            params=params,
            optuna_number=trial.number,
            optuna_id=trial._trial_id,
        )
        self.by_tune_id[tune_id] = rec
        self.progress()
        return {"trial": config}

    def epoch_result(self, tune_id: str, result: dict) -> bool:
        rec = self.by_tune_id.get(tune_id)
        if rec is None or self.studies is None or rec.phase != "search":
            return False
        self.add_epoch_row(rec, result)
        prune = self.studies.report_and_should_prune(
            rec.optuna_id, float(result["objective"]), int(result["epoch"])
        )
        if prune:
            # Record first, then tell Optuna: a driver killed in between leaves a record whose trial
            # Optuna still shows RUNNING (resume re-attaches it), never a finished trial without a row.
            rec.status = "pruned"
            self.finish(tune_id, error=None)
            self.studies.tell(rec.optuna_id, TrialState.PRUNED, status="pruned")
        return prune

    @staticmethod
    def add_epoch_row(rec: TrialRecord, result: dict) -> None:
        rec.node, rec.device = result.get("node", rec.node), result.get("device", rec.device)
        row = {k: result[k] for k in result if k in EPOCH_KEYS or k.startswith("term_")}
        rec.epoch_rows = [r for r in rec.epoch_rows if r["epoch"] != row["epoch"]] + [row]

    def search_trial_ended(self, tune_id: str, result: dict | None, error: bool) -> None:
        rec = self.by_tune_id.get(tune_id)
        if rec is None or self.studies is None or rec.phase != "search" or rec.status == "pruned":
            return
        if result and "final" in result:
            rec.payload = json.loads(result["final"])
        self.finish(tune_id, error="trial failed" if error else None)
        payload = rec.payload
        if error or payload is None:
            self.studies.tell(rec.optuna_id, TrialState.FAIL, status="failed")
        elif payload["status"] == "completed" and payload["best_value"] is not None:
            self.studies.tell(rec.optuna_id, TrialState.COMPLETE, payload["best_value"], status="completed")
        else:
            # Diverged trials are not COMPLETE: their value would mislead the sampler.
            self.studies.tell(rec.optuna_id, TrialState.FAIL, status=payload["status"])

    def finish(self, tune_id: str, error: str | None) -> None:
        rec = self.by_tune_id.get(tune_id)
        if rec is None:
            return
        if rec.ended_at is not None:
            if error is not None and rec.status == "failed" and error != rec.error:
                rec.error = error  # the callback knows the real error text; the searcher did not
                self.records.save(rec)
            return
        rec.ended_at = time.time()
        if error is not None:
            rec.status, rec.error = "failed", error
        elif rec.status != "pruned":
            rec.status = rec.payload["status"] if rec.payload else "failed"
            if rec.payload is None:
                rec.error = "trial ended without a final result"
        if rec.payload:
            # Epoch rows restored from a checkpoint on resume are in the payload, not in the live stream.
            rec.epoch_rows = rec.payload.get("epoch_rows") or rec.epoch_rows
            rec.started_at = rec.payload.get("started_at", rec.started_at)
        self.records.save(rec)
        self.progress()

    def new_final_trial(self, tune_id: str, cell: Cell, params: dict[str, Any], seed: int) -> dict[str, Any]:
        key = trial_key("final", cell.cell_id, seed)
        config = base_trial_config(
            self.spec, cell, params, seed=seed, phase="final", checkpoint_dir=self._checkpoint_dir(key)
        )
        self.by_tune_id[tune_id] = TrialRecord(
            key=key,
            trial_id=trial_id_for(self.spec.name, key),
            phase="final",
            cell_id=cell.cell_id,
            index=seed,
            config=config,
            params=dict(params),
        )
        self.progress()
        return {"trial": config}


@dataclass
class RayHandle:
    address: str
    temp_dir: str | None
    started_here: bool


# The handle of the Ray this process runs on (set by init_ray): cluster_slots tells local from remote.
_current_handle: RayHandle | None = None


def init_ray(address: str | None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> RayHandle:
    """Local Ray with a private temp dir (never joins another instance), or connect to `address`.

    Args:
        address: None or "local" for a private local Ray; else host:port, ray://host:port or "auto"
            (check it first with `check_address`: ray.init itself may wait a minute on a bad one).
        num_cpus: CPUs of the local Ray (None: all of this machine's); ignored when connecting.
        num_gpus: GPUs of the local Ray (None: those CUDA shows); ignored when connecting.
    """
    global _current_handle
    if address in (None, "local"):
        # Unix socket paths must stay short: a private dir directly under /tmp.
        temp_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
        ray.init(
            address="local",
            _temp_dir=temp_dir,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=True,
            logging_level="ERROR",
            _node_ip_address="127.0.0.1",
        )
        _current_handle = RayHandle("local", temp_dir, True)
    else:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        _current_handle = RayHandle(address, None, False)
    return _current_handle


def check_address(address: str, timeout_s: float = 5.0) -> str | None:
    """None if a Ray cluster's GCS port at `address` accepts a TCP connection, else a one-line reason.

    Runs before the results dir is touched, so a wrong address fails in seconds instead of in ray.init.
    Accepts host:port (IPv6 as [addr]:port), ray://host:port and "auto" ($RAY_ADDRESS, else the cluster
    last started here with `ray start`; resolved now so that "no cluster" also fails early). "local" is
    always fine. Only opens and closes one TCP connection: a port that answers but is not Ray is caught
    later by ray.init.

    Args:
        address: the --address value.
        timeout_s: how long to wait for the TCP handshake (an unroutable host takes this long).
    """
    import socket

    if address == "local":
        return None
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            address = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as exc:
            lines = str(exc).strip().splitlines() or [repr(exc)]
            return f"--address auto found no Ray cluster to join ({lines[0]})"
        except Exception:  # noqa: BLE001 - Ray's private helper moved: let ray.init resolve "auto"
            return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return (
            "--address must be host:port, ray://host:port, 'auto' or 'local' (e.g. 10.0.0.5:6379), "
            f"but got {address!r}"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"cannot reach a Ray cluster at {address} ({exc})"


def cluster_slots(spec: StudySpec, handle: RayHandle | None = None) -> int:
    """How many trials to run at once when --max-concurrent is not given.

    Rule: as many trials as fit in the resources the cluster has right now (CPUs // cpus_per_trial and,
    when trials take GPUs, GPUs / gpus_per_trial), at least 1. On a local Ray that is exact. On a remote
    cluster (`handle`, default the one init_ray returned last, did not start Ray here) it is only a lower
    bound: an autoscaling cluster that starts with no GPU workers reports 0 GPUs, which gives 1, and Tune
    then keeps only one trial pending, so the autoscaler never adds a second node. The cluster's maximum
    cannot be read reliably, so we do not guess it: we print a one-line hint to stderr to pass
    --max-concurrent (trials beyond the current resources wait PENDING, which is what makes the
    autoscaler add nodes).
    """
    import sys

    handle = handle or _current_handle
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    slots = int(cpus // spec.resources.cpus_per_trial + 1e-9)
    if spec.resources.gpus_per_trial > 0:
        slots = min(slots, int(gpus / spec.resources.gpus_per_trial + 1e-9))
    slots = max(slots, 1)
    if gpus > 0 and spec.resources.gpus_per_trial == 0:
        print(
            f"study: the cluster has {gpus:g} GPU(s) but resources.gpus_per_trial is 0, so trials run on "
            "CPUs; set it (e.g. 0.25 packs 4 small-model trials per GPU) to train on the GPUs.",
            file=sys.stderr,
        )
    if handle is not None and not handle.started_here:
        print(
            f"study: running {slots} trial(s) at once, sized from the cluster's current resources "
            f"({cpus:g} CPU, {gpus:g} GPU); if it autoscales, pass --max-concurrent for its full size.",
            file=sys.stderr,
        )
    return slots


def _resources(spec: StudySpec) -> dict[str, float]:
    return {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}


def run_trials(
    spec: StudySpec,
    out: Path,
    ctx: StudyContext,
    max_concurrent: int,
    on_search_done: Callable[[], None] = lambda: None,
) -> None:
    """Both phases in one Tuner (see the module docstring); `on_search_done` runs once, in the driver,
    when every cell's search has ended (also at once when a resumed study's search had ended before)."""
    cells = list(ctx.cells.values())
    searcher = CellSearcher(spec, cells, ctx.studies, ctx, on_search_done)
    remaining = searcher.remaining()
    if remaining == 0:
        searcher.queue_finals()  # nothing to run: still tells on_search_done
        return
    tuner = tune.Tuner(
        tune.with_resources(_trainable, _resources(spec)),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=OptunaPruningScheduler(ctx),
            # An upper bound: the searcher says FINISHED early when a cell has no final trials.
            num_samples=remaining,
            max_concurrent_trials=max_concurrent,
            # Re-using worker processes saves a Python + torch import and a dataset load per trial.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"trials-{int(time.time())}",
            storage_path=ctx.tune_storage[0] if ctx.tune_storage else str(out / "ray"),
            storage_filesystem=ctx.tune_storage[1] if ctx.tune_storage else None,
            callbacks=[Collector(ctx)],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            verbose=0,
        ),
    )
    tuner.fit()


def run_post_phase(spec: StudySpec, ctx: StudyContext, max_concurrent: int) -> None:
    """Transfer attacks (crafted on the ce model of the same cell and seed) and distillation, as Ray
    tasks over the finished final-phase models. Skips what earlier (interrupted) runs already did."""
    from study.trial import post
    from study.trial.evaluate import gradient_masking_row

    want_transfer = "transfer" in spec.evaluate.attacks and bool(spec.evaluate.eps)
    if not (want_transfer or spec.distill):
        return
    records = ctx.records.load_all("final")
    done = {k: r for k, r in records.items() if r["status"] == "completed" and r.get("payload")}
    by_cell_seed = {(r["cell_id"], r["index"]): r for r in done.values()}
    jobs: list[tuple[str, str, Any]] = []  # (record key, kind, ObjectRef)
    remote = ray.remote(num_cpus=spec.resources.cpus_per_trial, num_gpus=spec.resources.gpus_per_trial)
    transfer_task, distill_task = remote(post.transfer_rows), remote(post.distill_rows)
    for key, rec in done.items():
        conditions = {row["condition"] for row in rec["payload"]["eval_rows"]}
        cell = ctx.cells.get(rec["cell_id"])
        if cell is None:
            continue
        if want_transfer and cell.regularizer != "ce" and "transfer" not in conditions:
            ce_id = f"{cell.dataset}/{cell.model}/ce/{cell.noise_setting}"
            source = by_cell_seed.get((ce_id, rec["index"]))
            if source is not None:
                jobs.append((key, "transfer", transfer_task.remote(rec["config"], source["config"])))
        if spec.distill and "distill" not in conditions:
            jobs.append((key, "distill", distill_task.remote(rec["config"], spec.distill.model_dump())))
    pending = {ref: (key, kind) for key, kind, ref in jobs}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        key, kind = pending.pop(ready[0])
        rec = done[key]
        try:
            rows = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - one failed evaluation must not lose the others
            rec["payload"].setdefault("post_errors", []).append(f"{kind}: {str(exc).splitlines()[-1]}")
            ctx.records.save_dict(rec)
            continue
        evals = rec["payload"]["eval_rows"]
        evals.extend(rows)
        if kind == "transfer":
            # The flag now also sees the transfer attack: recompute it.
            evals[:] = [r for r in evals if r["metric"] != "gradient_masking"]
            evals.append(gradient_masking_row(evals))
        ctx.records.save_dict(rec)
        ctx.progress()


def shutdown(handle: RayHandle) -> None:
    ray.shutdown()


__all__ = [
    "CellStudies",
    "StudyContext",
    "init_ray",
    "run_trials",
    "run_post_phase",
    "cluster_slots",
    "check_address",
    "shutdown",
]
