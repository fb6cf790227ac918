"""The spec's ``tracking:`` block: TensorBoard, MLflow and W&B, one run per study trial. Ray-free.

Driven by the study's own trial records, never by Ray Tune: ``StudyContext.trial_ended``, the one end
of a trial (alone or a pack member, search or final, completed, pruned or failed), hands the ended
trial's record to ``Trackers.trial_ended``, which logs the whole trial at once: a run named
``cell/phase/#n`` (``run_name``) with the trial id as a tag, the flattened config as params
(``trial/train/lr``), every epoch row with step = epoch (``val_accuracy``, ``val_nll``, ``val_ece``,
``train_loss``, ``train_acc``, ``lr``, ...), the objective and, for a final trial, its clean test
metrics (``test_accuracy``, ``test_ece``, ...).

Logging a trial when it has ended is the simplest correct design: its record is complete then, exactly
once, whether it trained alone or in a pack, in one go or resumed from a checkpoint; the price is that
curves appear when a trial ends, not while it trains (the live view shows those). Rows the post phase
adds later (transfer attacks, distillation) are not logged. A trial logged again (it ran again after
a failure) gets a second MLflow and W&B run; its TensorBoard directory is replaced.

A tracker that fails (a server gone, a full disk) stops logging with one note, which the study prints
at its end and keeps in the manifest; the study goes on. ``check_tracking`` refuses a tracking URI that
cannot work before Ray starts.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

from study.spec import StudySpec
from study.sweep.net import check_tcp
from study.sweep.records import best_of_rows, clean_test_metrics, run_name, safe_name

# MLflow's tracking store schemes (a `+driver` suffix allowed, e.g. postgresql+psycopg2); plugins add
# theirs through the `mlflow.tracking_store` entry points.
MLFLOW_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                  "databricks-uc", "uc")  # fmt: skip
# What MLflow's run status says of how a trial ended (the study's status is a tag beside it).
MLFLOW_STATUS = {"completed": "FINISHED", "pruned": "KILLED"}


@dataclass(frozen=True)
class TrackedTrial:
    """What every tracker logs of one ended trial."""

    name: str
    trial_id: str
    study: str
    cell_id: str
    phase: str
    status: str
    params: dict[str, Any]  # the flattened config, "trial/train/lr": 0.01
    epochs: list[dict[str, float]]  # one per epoch, with "epoch"
    summary: dict[str, float]  # objective, best_epoch, test_* of a final trial
    started_at: float
    ended_at: float


def flatten(config: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Nested dicts as one level of ``a/b/c`` keys; other values (lists included) as they are."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}/{key}"))
        else:
            out[f"{prefix}/{key}"] = value
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def tracked_trial(spec: StudySpec, rec: dict[str, Any]) -> TrackedTrial:
    """A trial's record (``TrialRecord.to_json()``, as on disk) as the trackers log it."""
    payload = rec.get("payload") or {}
    epochs = []
    for row in sorted(rec.get("epoch_rows") or [], key=lambda r: r["epoch"]):
        values = {k: _number(v) for k, v in row.items() if k != "epoch"}
        epochs.append({"epoch": int(row["epoch"]), **{k: v for k, v in values.items() if v is not None}})
    best = payload.get("best_value") if payload else best_of_rows(rec, spec)
    summary = {"objective": best, "best_epoch": payload.get("best_epoch")}
    summary.update(clean_test_metrics(payload.get("eval_rows") or []))
    return TrackedTrial(
        name=run_name(rec),
        trial_id=rec["trial_id"],
        study=spec.name,
        cell_id=rec["cell_id"],
        phase=rec["phase"],
        status=rec["status"],
        params=flatten(rec["config"], "trial"),
        epochs=epochs,
        summary={k: float(v) for k, v in summary.items() if _number(v) is not None},
        started_at=float(rec.get("started_at") or time.time()),
        ended_at=float(rec.get("ended_at") or time.time()),
    )


class Tracker(Protocol):
    def log(self, trial: TrackedTrial) -> None: ...

    def close(self) -> None: ...


class Trackers:
    """The trackers the spec asks for, each opened at the first trial it logs."""

    def __init__(self, spec: StudySpec, out: Path, notes: list[str]) -> None:
        self.spec, self.out, self.notes = spec, out, notes
        t = spec.tracking
        asked = {"tensorboard": t.tensorboard, "mlflow": t.mlflow is not None, "wandb": t.wandb is not None}
        self.asked = [name for name, on in asked.items() if on]
        self.open: dict[str, Tracker] = {}
        self.broken: set[str] = set()

    def _tracker(self, name: str) -> Tracker:
        if name not in self.open:
            make = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}
            self.open[name] = make[name](self.spec, self.out)
        return self.open[name]

    def trial_ended(self, rec: dict[str, Any]) -> None:
        """Log one ended trial (its record as a dict) to every tracker still working."""
        if not self.asked:
            return
        trial = tracked_trial(self.spec, rec)
        for name in self.asked:
            if name in self.broken:
                continue
            try:
                self._tracker(name).log(trial)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops the study
                self.broken.add(name)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                self.notes.append(
                    f"tracking.{name}: stopped logging at trial {trial.name} ({type(exc).__name__}: {first})"
                )

    def close(self) -> None:
        for name, tracker in self.open.items():
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001 - closing must not mask how the run ended
                self.notes.append(f"tracking.{name}: could not close ({type(exc).__name__}: {exc})")
        self.open.clear()


def _hparam(value: Any) -> bool | int | float | str:
    return value if isinstance(value, bool | int | float | str) else str(value)


class TensorBoardTracker:
    """One event-file directory per trial, ``<out>/tensorboard/<cell_phase_n>/``: scalars per epoch, and
    the trial as an HParams session (its hyperparameters; the objective and test metrics as scalars
    of the same run, which HParams shows as its metric columns)."""

    def __init__(self, spec: StudySpec, out: Path) -> None:
        self.root = out / "tensorboard"

    def log(self, trial: TrackedTrial) -> None:
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        logdir = self.root / safe_name(trial.name.replace("#", ""))
        shutil.rmtree(logdir, ignore_errors=True)  # a trial logged again replaces its run
        hp = {**trial.params, "trial_id": trial.trial_id, "cell": trial.cell_id, "phase": trial.phase,
              "status": trial.status}  # fmt: skip
        last = max((row["epoch"] for row in trial.epochs), default=0)
        with SummaryWriter(logdir=str(logdir)) as writer:
            for row in trial.epochs:
                for key, value in row.items():
                    if key != "epoch":
                        writer.add_scalar(key, value, row["epoch"])
            # Only the session's start and end: with no experiment summary TensorBoard builds the
            # HParams table from every session (a per-run one would show only the first run's metrics).
            _, start, end = hparams({k: _hparam(v) for k, v in hp.items()}, trial.summary)
            writer.file_writer.add_summary(start)
            writer.file_writer.add_summary(end)
            for key, value in trial.summary.items():
                writer.add_scalar(key, value, last)

    def close(self) -> None:
        return None


def mlflow_uri(spec: StudySpec, out: Path) -> str:
    """The MLflow store: the spec's ``tracking_uri``, else $MLFLOW_TRACKING_URI, else a SQLite file in
    the results dir (never MLflow's own default, ./mlruns in whatever directory the run started)."""
    assert spec.tracking.mlflow is not None
    return (
        spec.tracking.mlflow.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{out.resolve()}/mlflow.db"
    )


class MlflowTracker:
    """One MLflow run per trial in the experiment ``experiment_name`` (default: the study's name), with
    tags study, cell, phase, trial_id, status; FINISHED, KILLED (pruned) or FAILED."""

    def __init__(self, spec: StudySpec, out: Path) -> None:
        from mlflow import MlflowClient

        assert spec.tracking.mlflow is not None
        # Its INFO lines on creating an SQLite store would print over the live view.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.client = MlflowClient(mlflow_uri(spec, out))
        name = spec.tracking.mlflow.experiment_name or spec.name
        experiment = self.client.get_experiment_by_name(name)
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)

    def log(self, trial: TrackedTrial) -> None:
        from mlflow.entities import Metric, Param

        tags = {"study": trial.study, "cell": trial.cell_id, "phase": trial.phase,
                "trial_id": trial.trial_id, "status": trial.status}  # fmt: skip
        start, end = int(trial.started_at * 1000), int(trial.ended_at * 1000)
        run = self.client.create_run(self.experiment_id, start_time=start, tags=tags, run_name=trial.name)
        run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in trial.params.items()]
        metrics = [
            Metric(k, v, start, row["epoch"]) for row in trial.epochs for k, v in row.items() if k != "epoch"
        ]
        step = max((row["epoch"] for row in trial.epochs), default=0)
        metrics += [Metric(k, v, end, step) for k, v in trial.summary.items()]
        for i in range(0, len(params), 100):  # MLflow's limits per log_batch call
            self.client.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])
        self.client.set_terminated(run_id, MLFLOW_STATUS.get(trial.status, "FAILED"), end_time=end)

    def close(self) -> None:
        return None


class WandbTracker:
    """One W&B run per trial (project, group: the study's name unless given, mode), its files under
    ``<out>/wandb/``; the epochs logged with step = epoch, the objective and test metrics as the summary."""

    def __init__(self, spec: StudySpec, out: Path) -> None:
        import wandb

        assert spec.tracking.wandb is not None
        self.wandb, self.spec, self.out = wandb, spec.tracking.wandb, out
        self.group = self.spec.group or spec.name
        # Quiet and lean: the live view owns the terminal; no system metrics, code or git state.
        self.settings = wandb.Settings(
            silent=True, console="off", x_disable_stats=True, save_code=False, disable_git=True
        )

    def log(self, trial: TrackedTrial) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        run = self.wandb.init(
            project=self.spec.project,
            entity=self.spec.entity,
            group=self.group,
            name=trial.name,
            job_type=trial.phase,
            tags=[trial.phase, trial.status],
            config={**trial.params, "trial_id": trial.trial_id, "cell": trial.cell_id},
            mode=self.spec.mode,
            dir=str(self.out),
            reinit="create_new",  # leaves a run of the user's own process alone
            settings=self.settings,
        )
        for row in trial.epochs:
            run.log({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        run.summary.update({**trial.summary, "status": trial.status})
        run.finish(exit_code=0 if trial.status == "completed" else 1)

    def close(self) -> None:
        self.wandb.teardown()  # stops W&B's service process


def check_tracking(spec: StudySpec, out: Path) -> str | None:
    """One line saying why the MLflow store cannot work (unknown scheme, a refused or uncreatable
    directory store, an SQLite file that cannot be created, a server that does not answer), else None.
    Writes nothing: the store is created at the first trial's end."""
    if spec.tracking.mlflow is None:
        return None
    uri = mlflow_uri(spec, out)
    where = (
        "tracking.mlflow.tracking_uri"
        if spec.tracking.mlflow.tracking_uri
        else "$MLFLOW_TRACKING_URI"
        if os.environ.get("MLFLOW_TRACKING_URI")
        else "the MLflow store"
    )
    parsed = urlparse(uri)
    scheme = "" if len(parsed.scheme) == 1 else parsed.scheme.split("+")[0]  # C:\... is a path
    plugins = {e.name for e in importlib.metadata.entry_points(group="mlflow.tracking_store")}
    if scheme not in MLFLOW_SCHEMES and scheme not in plugins:
        known = ", ".join(f"{s}://" for s in MLFLOW_SCHEMES if s)
        return f"{where}: unknown scheme {scheme!r} in {uri!r} (MLflow knows {known} and paths)"
    problem = None
    if scheme in ("", "file"):
        problem = _file_store_problem(uri, parsed)
    elif scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        problem = _creatable(Path(path), directory=False) if path not in ("", ":memory:") else None
    elif scheme in ("http", "https"):
        port = parsed.port or (443 if scheme == "https" else 80)
        problem = check_tcp(f"{parsed.hostname}:{port}") if parsed.hostname else "no host"
    return f"{where}: {uri!r}: {problem}" if problem else None


def _file_store_problem(uri: str, parsed: Any) -> str | None:
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # an MLflow that still takes directory stores
        pass
    else:
        if not MLFLOW_ALLOW_FILE_STORE.get():
            return (
                "MLflow refuses a directory store unless MLFLOW_ALLOW_FILE_STORE=true; use "
                "sqlite:///path/mlflow.db (the default: mlflow.db in the results directory)"
            )
    path = url2pathname(parsed.path) if parsed.scheme == "file" else uri
    return _creatable(Path(path), directory=True)


def _creatable(path: Path, *, directory: bool) -> str | None:
    """None if `path` (a directory, or a file) exists as such and is writable, or can be created."""
    path = path.expanduser().absolute()
    if path.exists():
        if path.is_dir() != directory:
            return f"{path} is {'not ' if directory else ''}a directory"
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is a file"
    return None if os.access(parent, os.W_OK) else f"cannot be created: {parent} is not writable"
