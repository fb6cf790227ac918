"""SQL over a results directory (DuckDB views on the Parquet files) and study discovery."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import filelock
import pandas as pd
import pyarrow.dataset as pa_ds
import pyarrow.parquet as pq

from reports.build import TABLES, ResultsError, _one_line, check_parquet, read_manifest
from study import vocabulary


def run_query(out_dir: str | os.PathLike | Sequence[str | os.PathLike], sql: str) -> pd.DataFrame:
    """Run ``sql`` on an in-memory DuckDB with views trials, epochs, evals, summary, projections, params
    (those present).

    The views expose the Parquet columns unchanged except ``trials.metric`` (the tuned objective),
    which is named ``objective_metric`` so that evals/summary joins on trial_id stay unambiguous.

    Several directories (a list): each view is the union of the directories' tables (by column name,
    so studies with different ``param_*`` columns stack), with a ``study`` column in every view naming
    the study (manifest name; the directory path when two given directories share a name). Join on
    ``(study, trial_id)`` then.

    Raises:
        ResultsError: not a study directory (no Parquet table), an unreadable/too-new Parquet file,
            or any DuckDB error (its message on one line).
    """
    many = not isinstance(out_dir, (str, os.PathLike))
    paths = [Path(p) for p in out_dir] if many else [Path(out_dir)]  # type: ignore[union-attr]
    labels = _study_labels(paths)
    con = duckdb.connect(":memory:")
    scratch = tempfile.mkdtemp(prefix="study-query-")
    try:
        _refuse_writes(con, sql)
        for name in TABLES:
            selects = []
            for i, (path, label) in enumerate(zip(paths, labels, strict=True)):
                file = path / f"{name}.parquet"
                if not file.is_file():
                    continue
                check_parquet(file)  # same schema-version and integrity rules as the Python reader
                # Read through pyarrow, not DuckDB's file system: DuckDB's own file access is switched
                # off below, so no statement can write, attach or read a file (allowed_paths would
                # let `COPY ... TO` overwrite the very files it allows).
                source = f"_{name}_{i}"
                con.register(source, pa_ds.dataset(str(file), format="parquet"))
                # trials.metric (the tuned objective, e.g. val_accuracy) would make every
                # `evals JOIN trials USING (trial_id)` ambiguous on `metric`: the view calls it
                # objective_metric.
                lit = label.replace("'", "''")
                star = "*"
                if many:
                    star = f"* REPLACE ('{lit}' AS study)" if _has(file, "study") else f"'{lit}' AS study, *"
                if name == "trials" and _has(file, "metric"):
                    star += " RENAME (metric AS objective_metric)"
                selects.append(f"SELECT {star} FROM {source}")
            if selects:
                con.execute(f"CREATE VIEW {name} AS " + " UNION ALL BY NAME ".join(selects))
        # Read-only from here on, by DuckDB's own settings: no file system (COPY/EXPORT/ATTACH/INSTALL,
        # read_csv('/etc/...'), spilling outside a scratch dir of ours), no extension loading, and the
        # configuration locked so that no statement can SET it back.
        con.execute(f"SET temp_directory = '{scratch}'")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        return con.execute(sql).df()
    except duckdb.Error as exc:
        raise ResultsError(_one_line(exc)) from exc
    finally:
        con.close()
        shutil.rmtree(scratch, ignore_errors=True)


# Statement types a read-only query may use (DuckDB's parser says which a statement is).
_READ_ONLY = {"SELECT", "EXPLAIN", "PRAGMA", "CALL", "RELATION", "INVALID"}


def _refuse_writes(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse, on one line, a statement that is not a query (COPY, EXPORT, ATTACH, INSTALL/LOAD, CREATE,
    INSERT, SET...): the results of a study are read-only here. DuckDB's settings are the guarantee;
    this names the statement instead of a file-system error. A syntax error is left to DuckDB."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error:
        return  # DuckDB reports it when the SQL runs, with its position
    for st in statements:
        kind = str(st.type).rsplit(".", 1)[-1]
        if kind not in _READ_ONLY:
            head = " ".join(st.query.split()[:2])
            raise ResultsError(
                f"study query is read-only: '{head} ...' is a {kind} statement; only queries "
                "(SELECT, WITH, DESCRIBE, SUMMARIZE, EXPLAIN) run here"
            )


def _study_labels(paths: list[Path]) -> list[str]:
    """The ``study`` value of each directory (checked to be a results directory)."""
    names = []
    for path in paths:
        if not path.is_dir():
            raise ResultsError(f"{path}: not a directory")
        if not any((path / f"{t}.parquet").is_file() for t in TABLES):
            raise ResultsError(
                f"{path}: not a study results directory (no trials/epochs/evals/summary Parquet)"
            )
        names.append(str(read_manifest(path).get("study") or path.name))
    dup = {n for n in names if names.count(n) > 1}
    return [str(p) if n in dup else n for p, n in zip(paths, names, strict=True)]


def _has(file: Path, column: str) -> bool:
    return column in pq.read_schema(file).names


def _status_counts(file: Path) -> dict[str, int]:
    try:
        col = pq.read_table(file, columns=["status"]).column("status").to_pylist()
    except Exception:  # a listing should not fail on one unreadable study
        return {}
    counts: dict[str, int] = {}
    for s in col:
        counts[str(s)] = counts.get(str(s), 0) + 1
    return counts


def driver_alive(study_dir: Path) -> bool | None:
    """Whether a `study run` holds the directory's writer lock (True), nobody does (False: its driver
    died), or it cannot be told (None: no write access to try the lock)."""
    lock_path = study_dir / vocabulary.LOCK_FILE
    if not lock_path.exists():
        return False  # a running driver always has it (lock files appeared with the lock itself)
    lock = filelock.FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        return True
    except OSError:
        return None
    lock.release()
    return False


def last_ran(manifest: dict[str, Any]) -> float | None:
    """When the study's run last did something (unix s), from its manifest: the latest of its start,
    resume, phase changes and end. A report changes none of them."""
    phases = manifest.get("phases")
    times = [manifest.get(k) for k in ("started_at", "resumed_at", "ended_at")]
    times += [p[1] for p in phases if isinstance(p, list) and len(p) == 2] if isinstance(phases, list) else []
    found = [float(t) for t in times if isinstance(t, (int, float)) and not isinstance(t, bool)]
    return max(found) if found else None


def list_studies(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Studies (dirs with manifest.json) at ``root`` or up to 2 levels below, sorted by path.

    A study whose manifest says it is running but whose writer lock nobody holds is shown as
    "interrupted": its driver was killed (continue it with `study run --resume`).

    Returns:
        One dict per study: study, path, status, trials ({status: count}), last_ran (unix s: the
        manifest's latest start, resume, phase change or end; None without one), last_modified (unix s,
        newest file in the directory).

    Raises:
        ResultsError: ``root`` is not a directory.
    """
    base = Path(root)
    if not base.is_dir():
        raise ResultsError(f"{base}: not a directory")
    found = [base, *base.glob("*/"), *base.glob("*/*/")]
    out = []
    for d in sorted({p for p in found if (p / "manifest.json").is_file()}):
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            manifest = manifest if isinstance(manifest, dict) else {}
            status = str(manifest.get("status", "unknown"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            manifest, status = {}, "unreadable manifest"
        if status in vocabulary.RUNNING_STATUSES and driver_alive(d) is False:
            status = "interrupted"  # the manifest says running, but its driver is gone (e.g. SIGKILL)
        files = [f for f in d.iterdir() if f.is_file()]
        out.append({
            "study": str(manifest.get("study") or d.name),
            "path": str(d),
            "status": status,
            "trials": _status_counts(d / "trials.parquet") if (d / "trials.parquet").is_file() else {},
            "last_ran": last_ran(manifest),
            "last_modified": max(f.stat().st_mtime for f in files) if files else None,
        })  # fmt: skip
    return out
