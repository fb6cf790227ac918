"""Trial records and the result tables built from them. Ray-free: the sweep's Ray adapter writes
records, and writing Parquet (here, through reports.build's one table writer) never imports ray.

A record (``records/<phase>/<key>.json``) is the driver's durable memory of one trial across kills:
its key, config, sampled params, status, epoch rows and final payload (evaluation rows, projection).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.spec import StudySpec
from study.sweep.cells import Cell, expand_cells
from study.trial.config import TrialConfig
from study.vocabulary import BIN_METRIC_PREFIX


def trial_key(phase: str, cell_id: str, index: int) -> str:
    return f"{phase}|{cell_id}|{index}"


def trial_id_for(study: str, key: str) -> str:
    return hashlib.sha1(f"{study}|{key}".encode()).hexdigest()[:12]


def safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def run_name(rec: TrialRecord | dict[str, Any]) -> str:
    """A trial's readable name, ``cell/phase/#n`` (what Tune, TensorBoard, MLflow and W&B show)."""
    r = rec if isinstance(rec, dict) else rec.__dict__
    return f"{r['cell_id']}/{r['phase']}/#{r['index']}"


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


class DiskFull(BaseException):
    """A record could not be written for lack of space (ENOSPC, EDQUOT): the study stops, its manifest
    says failed, and `study run` says so on one line. A BaseException, like KeyboardInterrupt, because
    Ray Tune logs and ignores an Exception raised in its callbacks and would run on without records."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"no space left on the device writing {path} ({exc.strerror or exc})")
        self.path = path


class Records:
    """Per-trial JSON records in the results dir: the driver's durable memory across kills."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, phase: str, key: str) -> Path:
        return self.root / phase / f"{safe_name(key)}.json"

    def save(self, rec: TrialRecord) -> None:
        self.save_dict(rec.to_json())

    def save_dict(self, rec: dict[str, Any]) -> None:
        path = self.path(rec["phase"], rec["key"])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec, default=str))
            os.replace(tmp, path)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                raise DiskFull(path, exc) from None
            raise

    def load(self, phase: str, key: str) -> dict[str, Any]:
        return json.loads(self.path(phase, key).read_text())

    def load_all(self, phase: str) -> dict[str, dict[str, Any]]:
        """The phase's readable records by key (an unreadable one is left out: see ``repair``)."""
        out = {}
        for p in sorted((self.root / phase).glob("*.json")):
            rec = _read(p)
            if rec is not None:
                out[rec["key"]] = rec
        return out

    def repair(self) -> list[str]:
        """Set aside every record that cannot be read (truncated, garbled: `<name>.json.damaged-<time>`)
        and say what that means, one note per file: a final trial's runs again (it is not done); a search
        trial's Optuna result still guides the search, but its row is missing from the tables."""
        notes = []
        for phase in ("search", "final"):
            for p in sorted((self.root / phase).glob("*.json")):
                if _read(p) is not None:
                    continue
                backup = p.with_name(f"{p.name}.damaged-{int(time.time())}")
                os.replace(p, backup)
                then = (
                    "the trial runs again"
                    if phase == "final"
                    else "its Optuna result is kept, its row is missing from the tables"
                )
                notes.append(f"records/{phase}/{p.name}: unreadable, set aside as {backup.name}; {then}")
        return notes


def _read(path: Path) -> dict[str, Any] | None:
    """A record's content, or None when it cannot be read as one (a torn or garbled file)."""
    try:
        rec = json.loads(path.read_bytes())
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("key"), str) else None


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
        trials.append(_trial_row(spec, cell, rec))
        for e in rec.get("epoch_rows") or []:
            epochs.append({"trial_id": rec["trial_id"], **e})
        for ev in (rec.get("payload") or {}).get("eval_rows") or []:
            evals.append({"trial_id": rec["trial_id"], **ev})
    return trials, epochs, evals


def _trial_row(spec: StudySpec, cell: Cell, rec: dict[str, Any]) -> dict[str, Any]:
    """One trials.parquet row: the cell, the resolved config, how the trial ended."""
    cfg = TrialConfig.model_validate(rec["config"])
    payload = rec.get("payload") or {}
    reg_params = cfg.regularizer.params
    strength_param, strength = _strength(cell.regularizer, reg_params)
    row = {
        "study": spec.name,
        "phase": rec["phase"],
        "cell_id": cell.base_id,
        "replica": cell.replica or 0,
        "trial_id": rec["trial_id"],
        "dataset": cell.dataset,
        "model": cell.model,
        "regularizer": cell.arm,
        "strength_param": strength_param,
        "strength": strength,
        "noise_kind": cell.noise.kind,
        "noise_rate": cell.noise.rate,
        "noise_mode": cell.noise.mode,
        "noise_setting": cell.noise.label,
        "realized_noise_rate": payload.get("realized_noise_rate"),
        "noise_seed": cfg.noise_seed,
        "seed": cfg.seed,
        "status": rec["status"],
        "epochs": len(rec.get("epoch_rows") or []),
        "max_epochs": cfg.train.epochs,
        "best_value": payload.get("best_value") if payload else best_of_rows(rec, spec),
        "best_epoch": payload.get("best_epoch"),
        "metric": spec.search.metric,
        "direction": spec.search.direction,
        "wall_s": payload.get("wall_s") or ((rec.get("ended_at") or rec["started_at"]) - rec["started_at"]),
        "device": payload.get("device") or rec.get("device"),
        "node": payload.get("node") or rec.get("node"),
        "error": rec.get("error"),
        "started_at": rec["started_at"],
        "ended_at": rec.get("ended_at"),
        "optuna_number": rec.get("optuna_number"),
    }
    values = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, **reg_params}
    for k, v in values.items():
        if isinstance(v, dict):  # a schedule: numeric start and end columns, the whole in params_text
            row[f"param_{k}"], row[f"param_{k}_end"] = float(v["start"]), float(v["end"])
        else:
            row[f"param_{k}"] = v
    row["params_text"] = params_text(values)
    return row


def params_text(values: dict[str, Any]) -> str:
    """The hyperparameters as a reader wants them: "alpha=0.1->0.2 linear, lr=0.011, weight_decay=0"."""
    parts = []
    for k, v in sorted(values.items()):
        if isinstance(v, dict):
            parts.append(f"{k}={v['start']:.3g}->{v['end']:.3g} {v.get('schedule', 'linear')}")
        else:
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def best_of_rows(rec: dict[str, Any], spec: StudySpec) -> float | None:
    """The best value of the search metric over a record's epoch rows (a pruned trial has no payload)."""
    vals = [
        r[spec.search.metric] for r in rec.get("epoch_rows") or [] if r.get(spec.search.metric) is not None
    ]
    if not vals:
        return None
    return max(vals) if spec.search.direction == "maximize" else min(vals)


def write_tables(spec: StudySpec, out: Path) -> None:
    """Rebuild trials, epochs, evals and projections Parquet from the records (atomic, versioned)."""
    from reports.build import write_results

    recs = Records(out / "records")
    records = list(recs.load_all("search").values()) + list(recs.load_all("final").values())
    trials, epochs, evals = record_rows(spec, records)
    projections = [
        {"trial_id": rec["trial_id"], **row}
        for rec in records
        for row in (rec.get("payload") or {}).get("projection") or []
    ]
    write_results(out, trials=trials, epochs=epochs, evals=evals, projections=projections or None)


def trial_payload(result: Any, *, node: str, started_at: float) -> dict[str, Any]:
    """What a trial reports when it ends (a TrialResult as JSON-able values): the record's payload."""
    return {
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


def final_result(result: Any, *, node: str, started_at: float) -> dict[str, Any]:
    """A trial's last Tune result: its payload as JSON and the objective."""
    value = result.best_value if result.best_value is not None else float("nan")
    payload = trial_payload(result, node=node, started_at=started_at)
    return {"final": json.dumps(payload), "objective": value}


def clean_test_metrics(eval_rows: list[dict[str, Any]]) -> dict[str, float]:
    """A final trial's clean test metrics as ``test_<metric>`` (``test_accuracy``, ``test_ece``, ...):
    what the trackers show beside the curves (reliability-diagram bins left out)."""
    return {
        f"test_{r['metric']}": float(r["value"])
        for r in eval_rows
        if (r["split"], r["condition"]) == ("test", "clean") and not r["metric"].startswith(BIN_METRIC_PREFIX)
    }


class PhaseFailed(RuntimeError):
    """Every trial of a phase failed: the study ran but has no result (exit code 1, manifest failed)."""


def check_phases(out_dir: Path) -> None:
    """PhaseFailed naming the phase and the first trial's error when every trial of a phase failed."""
    records = Records(out_dir / "records")
    for phase in ("search", "final"):
        recs = list(records.load_all(phase).values())
        if recs and all(r.get("status") == "failed" for r in recs):
            errors = [str(r.get("error") or "").strip() for r in recs]
            first = next((e for e in errors if e), "no error text")
            lines = [ln.strip() for ln in first.splitlines() if ln.strip()]
            # Ray's error text ends with the exception line; earlier lines are its traceback.
            why = lines[-1] if lines else first
            raise PhaseFailed(
                f"every trial of the {phase} phase failed ({len(recs)} trials); the first: {why}"
            )
