"""Results directory I/O: typed, versioned, atomically written Parquet tables.

The column contract of every table lives here (``SCHEMAS``), so the sweep (study/sweep) and the
readers agree on names and types. ``write_table`` is the only writer: it casts each declared column
to its declared Arrow type (so a column is float64 in every file even when a batch happened to hold
only integers or only nulls), adds declared-but-missing columns as nulls, unions varying column sets
(``param_*`` hyperparameters, ``term_*`` loss decomposition terms), stamps the schema version into
the file's key-value metadata and replaces the target with ``os.replace`` so a reader never sees a
half-written file.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from study import vocabulary

# 1.1: summary comparison columns, projections table; 1.2: summary for every reference, trial times as
# timestamps
SCHEMA_VERSION = "1.2"
SCHEMA_KEY = b"regstudy.schema_version"
TABLES = ("trials", "epochs", "evals", "summary", "projections", "params")
MANIFEST_STATUSES = vocabulary.MANIFEST_STATUSES

_S, _F, _I, _B = pa.string(), pa.float64(), pa.int64(), pa.bool_()
_T = pa.timestamp("us", tz="UTC")  # written from unix seconds (what the records hold)

SCHEMAS: dict[str, dict[str, pa.DataType]] = {
    "trials": {
        "study": _S, "phase": _S, "cell_id": _S, "replica": _I, "trial_id": _S, "dataset": _S, "model": _S,
        "regularizer": _S, "strength_param": _S, "strength": _F, "noise_kind": _S, "noise_rate": _F,
        "noise_mode": _S, "noise_setting": _S, "realized_noise_rate": _F, "noise_seed": _I, "seed": _I,
        "status": _S, "epochs": _I, "max_epochs": _I, "best_value": _F, "best_epoch": _I, "metric": _S,
        "direction": _S, "wall_s": _F, "device": _S, "node": _S, "error": _S, "started_at": _T,
        "ended_at": _T, "optuna_number": _I, "params_text": _S,
    },
    "epochs": {"trial_id": _S, **{c: (_I if c == "epoch" else _F) for c in vocabulary.EPOCH_COLUMNS}},
    "projections": {"trial_id": _S, "cls": _I, "x": _F, "y": _F},
    # Hyperparameters in long format (one row per trial and parameter), so that the trials of studies
    # with different parameters stack: value is the number (a ramp's start value; NaN for a text
    # value), value_text the value as written when it is not a plain number (a ramp's JSON, a string).
    "params": {"trial_id": _S, "name": _S, "value": _F, "value_text": _S},
    "evals": {"trial_id": _S, "split": _S, "condition": _S, "severity": _F, "metric": _S, "value": _F},
    "summary": {
        "study": _S, "cell_id": _S, "dataset": _S, "model": _S, "regularizer": _S, "noise_setting": _S,
        "noise_kind": _S, "noise_rate": _F, "split": _S, "condition": _S, "severity": _F, "metric": _S,
        "mean": _F, "std": _F, "n": _I, "ci_low": _F, "ci_high": _F, "delta_vs_ce": _F, "reference": _S,
        "n_pairs": _I, "diff": _F, "diff_ci_low": _F, "diff_ci_high": _F, "effect_size_dz": _F, "p_value": _F,
        "p_adjusted": _F, "significant": _B, "best_params": _S, "best_strength": _F, "correction": _S,
        "test": _S, "n_above": _I, "n_below": _I, "p_adjusted_pairs": _F, "verdict": _S,
    },
}  # fmt: skip

# Columns whose values are checked on write: a typo here would silently drop rows from every report.
_ENUMS = {
    ("trials", "phase"): vocabulary.PHASES,
    ("trials", "status"): vocabulary.TRIAL_STATUSES,
    ("trials", "direction"): ("maximize", "minimize"),
    ("evals", "split"): vocabulary.SPLITS,
}
_REQUIRED = {"trials": ("trial_id", "cell_id", "phase", "status"), "epochs": ("trial_id", "epoch"),
             "evals": ("trial_id", "metric", "value"), "summary": ("cell_id", "metric"),
             "projections": ("trial_id", "cls", "x", "y"), "params": ("trial_id", "name")}  # fmt: skip


class ResultsError(ValueError):
    """A results directory or one of its files cannot be used (missing, corrupted, too new)."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _infer_type(values: pd.Series) -> pa.DataType:
    """Arrow type for an undeclared column (``param_*`` and friends): bool, int64, float64 or string."""
    present = [v for v in values.tolist() if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if not present:
        return _F  # an all-null hyperparameter column: float keeps it numeric when later files fill it
    if all(isinstance(v, (bool, np.bool_)) for v in present):
        return _B
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in present):
        return _I
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in present):
        return _F
    return _S


def _to_arrow(name: str, df: pd.DataFrame) -> pa.Table:
    declared = SCHEMAS[name]
    for col in _REQUIRED[name]:
        if len(df) and col not in df.columns:
            raise ValueError(f"{name} rows must have a {col!r} column, but got columns {sorted(df.columns)}.")
    for (table, col), allowed in _ENUMS.items():
        if table == name and col in df.columns:
            bad = set(df[col].dropna().unique()) - set(allowed)
            if bad:
                raise ValueError(f"{name}.{col} must be one of {allowed}, but got {sorted(map(str, bad))}.")
    extra = sorted(c for c in df.columns if c not in declared)
    arrays, fields = [], []
    for col in [*declared, *extra]:
        series = df[col] if col in df.columns else pd.Series([None] * len(df), dtype=object)
        if col in declared:
            typ = declared[col]
        elif col.startswith("term_"):
            typ = _F
        else:
            typ = _infer_type(series)
        if typ == _S and series.dtype == object:
            series = series.map(lambda v: v if v is None or isinstance(v, str) or v != v else str(v))
        if typ == _T and not pd.api.types.is_datetime64_any_dtype(series):
            seconds = pd.to_numeric(series, errors="coerce")
            series = pd.to_datetime((seconds * 1e6).round(), unit="us", utc=True)
        try:
            arrays.append(pa.array(series, type=typ, from_pandas=True))
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ValueError(f"{name}.{col} must hold {typ} values, but: {_one_line(exc)}") from exc
        fields.append(pa.field(col, typ))
    schema = pa.schema(fields, metadata={SCHEMA_KEY: SCHEMA_VERSION.encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def write_table(out_dir: str | os.PathLike, name: str, rows: list[dict[str, Any]] | pd.DataFrame) -> Path:
    """Write one table atomically as ``out_dir/<name>.parquet``.

    Args:
        out_dir: results directory (created if missing).
        name: one of ``TABLES``.
        rows: list of row dicts (keys may differ between rows: columns are unioned, missing cells
            null) or a DataFrame. An empty list writes a zero-row file with the declared columns.

    Returns:
        The path written.

    Raises:
        ValueError: unknown table name, a required column missing, an enum column with an unknown
            value, or a value that cannot be cast to its column's declared type.
    """
    if name not in SCHEMAS:
        raise ValueError(f"name must be one of {TABLES}, but got {name!r}.")
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    table = _to_arrow(name, df)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.parquet"
    # Not mkstemp: it creates the file 0600, and results on shared storage must stay readable by the
    # group (the umask decides, 0644 with the usual 022). The name is unique per process and call.
    tmp = out / f".{name}.{os.getpid()}.{secrets.token_hex(6)}.parquet.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def empty_table(name: str) -> pd.DataFrame:
    """A zero-row DataFrame with the declared columns of table ``name``."""
    return _to_arrow(name, pd.DataFrame()).to_pandas()


def check_parquet(path: Path) -> pq.ParquetFile:
    """Open a Parquet file and check its schema version; ResultsError (one line) if unusable."""
    if not path.is_file():
        raise ResultsError(f"{path}: missing")
    try:
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
    except (pa.ArrowException, OSError) as exc:
        raise ResultsError(f"{path}: corrupted or truncated Parquet file ({_one_line(exc)})") from exc
    version = meta.get(SCHEMA_KEY, SCHEMA_VERSION.encode()).decode(errors="replace")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise ResultsError(f"{path}: unreadable schema version {version!r}") from None
    if major > int(SCHEMA_VERSION.split(".")[0]):
        raise ResultsError(
            f"{path}: schema version {version} is newer than this reader's {SCHEMA_VERSION}; upgrade regstudy"
        )
    return pf


def read_table(out_dir: str | os.PathLike, name: str) -> pd.DataFrame:
    """Read ``out_dir/<name>.parquet`` into pandas.

    Raises:
        ResultsError: the file is missing, corrupted or truncated, or has a newer MAJOR schema version.
    """
    path = Path(out_dir) / f"{name}.parquet"
    pf = check_parquet(path)
    try:
        return pf.read().to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise ResultsError(f"{path}: corrupted or truncated Parquet file ({_one_line(exc)})") from exc


PARAM_PREFIX = "param_"


def _param_value(v: Any) -> tuple[float, str | None] | None:
    """(value, value_text) of one hyperparameter as trials.parquet holds it; None when absent."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, (bool, np.bool_, int, float, np.integer, np.floating)):
        return float(v), None
    text = str(v)
    try:
        parsed = json.loads(text)
    except ValueError:
        return math.nan, text
    if isinstance(parsed, dict) and isinstance(parsed.get("start"), (int, float)):
        return float(parsed["start"]), text  # a ramp {start, end, schedule}: its start value
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        return float(parsed), None
    return math.nan, text


def params_long(trials: list[dict[str, Any]] | pd.DataFrame) -> list[dict[str, Any]]:
    """The ``param_<name>`` columns of trials rows in long format (the ``params`` table)."""
    df = trials if isinstance(trials, pd.DataFrame) else pd.DataFrame(list(trials))
    cols = [c for c in df.columns if c.startswith(PARAM_PREFIX)]
    out = []
    for row in df[["trial_id", *cols]].itertuples(index=False, name=None) if cols else []:
        for col, v in zip(cols, row[1:], strict=True):
            got = _param_value(v)
            if got is not None:
                out.append({"trial_id": row[0], "name": col.removeprefix(PARAM_PREFIX), "value": got[0],
                            "value_text": got[1]})  # fmt: skip
    return out


def write_results(
    out_dir: str | os.PathLike,
    *,
    trials: list[dict[str, Any]] | pd.DataFrame,
    epochs: list[dict[str, Any]] | pd.DataFrame,
    evals: list[dict[str, Any]] | pd.DataFrame,
    projections: list[dict[str, Any]] | pd.DataFrame | None = None,
) -> None:
    """Write the raw tables (each atomically; projections only when given; params derived from the
    trials' ``param_*`` columns). Types are checked for all of them before any write, so a bad batch
    changes nothing."""
    tables = {"trials": trials, "epochs": epochs, "evals": evals, "params": params_long(trials)}
    if projections is not None:
        tables["projections"] = projections
    for name, rows in tables.items():  # validate everything first
        _to_arrow(name, rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows)))
    for name, rows in tables.items():
        write_table(out_dir, name, rows)


@dataclass
class Study:
    """One results directory loaded in memory.

    Attributes:
        path: the directory.
        name: study name (manifest ``study``, else the directory name).
        manifest: parsed manifest.json (empty dict if absent).
        trials, epochs, evals: raw tables (zero-row frames with declared columns when a file is absent).
        summary: summary table if built (``build_summary``), else None.
        partial: True when the manifest status is not "completed" (or there is no manifest).
    """

    path: Path
    name: str
    manifest: dict[str, Any]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    evals: pd.DataFrame
    summary: pd.DataFrame | None
    partial: bool

    @property
    def status(self) -> str:
        return str(self.manifest.get("status", "unknown"))

    @property
    def margins(self) -> dict[str, float]:
        """The spec's equivalence margins per metric (``margins:``; validated by `study run`)."""
        try:
            spec = yaml.safe_load((self.path / "spec.yaml").read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return {}
        margins = spec.get("margins") if isinstance(spec, dict) else None
        return {str(k): float(v) for k, v in margins.items()} if isinstance(margins, dict) else {}


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse ``path/manifest.json``; {} if absent, ResultsError if unreadable."""
    file = path / "manifest.json"
    if not file.is_file():
        return {}
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{file}: unreadable manifest ({_one_line(exc)})") from exc
    if not isinstance(manifest, dict):
        raise ResultsError(f"{file}: manifest must be a JSON object")
    return manifest


def load_study(out_dir: str | os.PathLike) -> Study:
    """Load a results directory.

    Raises:
        ResultsError: not a directory, neither manifest.json nor trials.parquet present, or any
            present file unreadable.
    """
    path = Path(out_dir)
    if not path.is_dir():
        raise ResultsError(f"{path}: not a directory")
    has_trials = (path / "trials.parquet").exists()
    if not (path / "manifest.json").exists() and not has_trials:
        raise ResultsError(f"{path}: not a study results directory (no manifest.json or trials.parquet)")
    manifest = read_manifest(path)
    frames = {
        name: read_table(path, name) if (path / f"{name}.parquet").exists() else empty_table(name)
        for name in ("trials", "epochs", "evals")
    }
    summary = read_table(path, "summary") if (path / "summary.parquet").exists() else None
    return Study(
        path=path,
        name=str(manifest.get("study") or path.name),
        manifest=manifest,
        summary=summary,
        partial=manifest.get("status") != "completed",
        **frames,
    )


def build_summary(out_dir: str | os.PathLike, *, write: bool = True) -> pd.DataFrame:
    """Compute the summary table with every regularizer as the reference in turn (``reports.stats.
    summarize(..., all_pairs=True)``: any ``--reference`` or pair is a filter of it) and write
    summary.parquet. Called by the run, never by the report.

    Args:
        out_dir: results directory.
        write: False computes without touching the directory.
    """
    from reports.stats import summarize

    study = load_study(out_dir)
    summary = summarize(study.trials, study.evals, study=study.name, all_pairs=True, margins=study.margins)
    if write:
        write_table(out_dir, "summary", summary)
    return summary
