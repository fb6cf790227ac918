"""Crash testing as databases do it (issue 24): SIGKILL the driver of a small packed study with a post
phase at random instants, resume it each time, and check that no trial is lost, duplicated or re-run and
that its tables equal an uninterrupted run's.

    python bench/bench_crash.py [KILLS] [SEED]   # default 50 kills, seed 0; results as markdown lines

Each study is started, killed at an instant drawn uniformly from [0, T] seconds after its `study run`
(or `--resume`) process starts (T: the wall time of the uninterrupted run), resumed, and so on until
a resume runs to completion; then the next study starts, until KILLS kills have been made. Checks:

- lost / duplicated: the trials table holds exactly the uninterrupted run's trials (search trials by
  cell and params, final trials by cell and seed), each once, none failed;
- re-run: a trial recorded as ended before a kill keeps its record's start and end times through every
  later resume (a re-run would write new ones);
- equal tables: trials (without wall-clock columns), epochs and evals values equal the uninterrupted
  run's for the same (cell, params) or (cell, seed).

The study uses the grid sampler (the set of search configurations does not depend on when the driver
was killed: a random or TPE sampler is re-seeded on resume, so its later draws differ), no pruner (a
median pruner's decision depends on the order in which trials report) and two trials per process.
bench/bench_crash.md records the results with the machine and its load.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
STUDY_BIN = str(Path(sys.executable).with_name("study"))

SPEC = """\
name: crash
dataset: {name: mnist1d, options: {max_train: 600, max_test: 200}}
models: [{name: mlp, options: {hidden: [32]}}]
regularizers:
  ce: {}
  label_smoothing: {alpha: 0.1}
noise: [{kind: none}]
train: {epochs: 3, batch_size: 128, lr: {grid: [0.003, 0.01, 0.02]}}
search: {trials_per_cell: 3, sampler: grid, pruner: {kind: none}}
final: {seeds: 2}
evaluate: {attacks: [fgsm, transfer], eps: [0.1], max_samples: 100}
resources: {cpus_per_trial: 1, trials_per_process: 2}
"""

# Columns that are when/where a trial ran, not what it computed.
CLOCK = {"wall_s", "started_at", "ended_at", "node", "device", "time_s", "epoch_s", "wall_time_s"}


def run(spec: Path, out: Path, *, resume: bool, kill_after: float | None) -> tuple[bool, float]:
    """One `study run` process; SIGKILL it `kill_after` seconds after it started. Returns (completed,
    seconds it ran)."""
    cmd = [STUDY_BIN, "run", str(spec), "--out", str(out), "--quiet", "--no-report", "--max-concurrent", "1"]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*cmd, *(["--resume"] if resume else [])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return False, time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"study run exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
    return True, time.monotonic() - t0


def ended_records(out: Path) -> dict[str, tuple[Any, Any]]:
    """Trial key -> (started_at, ended_at) of every record of an ended trial."""
    found = {}
    for path in sorted((out / "records").glob("*/*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("status") not in (None, "running") and rec.get("ended_at") is not None:
            found[rec["key"]] = (rec["started_at"], rec["ended_at"])
    return found


def tables(out: Path) -> dict[str, pd.DataFrame]:
    """The study's tables keyed by what a trial computed, not by its id: search trials by (cell,
    params), final trials by (cell, seed)."""
    trials = pd.read_parquet(out / "trials.parquet")
    params = sorted(c for c in trials.columns if c.startswith("param_"))
    trials["what"] = [
        f"{r.cell_id}|{r.phase}|" + (f"seed={r.seed}" if r.phase == "final" else
                                     ",".join(f"{p}={getattr(r, p)!r}" for p in params))
        for r in trials.itertuples()
    ]  # fmt: skip
    what = dict(zip(trials.trial_id, trials.what, strict=True))
    out_tables = {"trials": trials}
    for name in ("epochs", "evals"):
        df = pd.read_parquet(out / f"{name}.parquet")
        df["what"] = df.trial_id.map(what)
        out_tables[name] = df
    keep = {}
    for name, df in out_tables.items():
        cols = [c for c in df.columns if c not in CLOCK and c not in ("trial_id", "optuna_number", "study")]
        keys = [c for c in ("what", "epoch", "split", "condition", "severity", "metric") if c in cols]
        keep[name] = df[cols].sort_values(keys).reset_index(drop=True)
    return keep


def compare(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame]) -> list[str]:
    problems = []
    for name, w in want.items():
        g = got[name]
        if list(g.columns) != list(w.columns) or len(g) != len(w):
            problems.append(f"{name}: shape {g.shape} vs {w.shape}")
            continue
        for col in w.columns:
            a, b = g[col], w[col]
            if pd.api.types.is_float_dtype(b):
                same = ((a - b).abs() <= 1e-6 * b.abs().clip(lower=1.0)) | (a.isna() & b.isna())
            else:
                same = a.map(repr) == b.map(repr)
            if not same.all():
                problems.append(f"{name}.{col}: {int((~same).sum())} of {len(b)} differ")
    return problems


def check(out: Path, reference: dict[str, pd.DataFrame]) -> dict[str, Any]:
    got = tables(out)
    trials = got["trials"]
    want = reference["trials"]
    return {
        "lost": len(set(want.what) - set(trials.what)),
        "duplicated": int(trials.what.duplicated().sum()),
        "failed": int((trials.status == "failed").sum()),
        "differences": compare(got, reference),
    }


def main(kills: int = 50, seed: int = 0) -> None:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="bench-crash-"))
    spec = work / "spec.yaml"
    spec.write_text(SPEC)
    done, whole = run(spec, work / "reference", resume=False, kill_after=None)
    assert done
    reference = tables(work / "reference")
    print(f"- uninterrupted run: {whole:.1f} s, {len(reference['trials'])} trials")
    made, studies, rerun, results = 0, 0, 0, []
    t_start = time.monotonic()
    while made < kills:
        studies += 1
        out = work / f"study{studies}"
        resume, segments, instants = False, 0, []
        seen: dict[str, tuple[Any, Any]] = {}
        while True:
            instant = rng.uniform(0.0, whole) if made < kills else None
            completed, ran = run(spec, out, resume=resume, kill_after=instant)
            segments += 1
            now = ended_records(out) if out.exists() else {}
            rerun += sum(1 for k, v in seen.items() if now.get(k) != v)
            seen.update(now)
            if completed:
                break
            made += 1
            instants.append(round(instant, 1))
            resume = (out / "manifest.json").exists()
        result = check(out, reference)
        result.update(study=studies, kills=len(instants), instants=instants)
        results.append(result)
        print(
            f"- study {studies}: {len(instants)} kills at {instants} s; lost {result['lost']}, "
            f"duplicated {result['duplicated']}, failed {result['failed']}, "
            f"tables {'equal' if not result['differences'] else result['differences']}",
            flush=True,
        )
    lost = sum(r["lost"] for r in results)
    dup = sum(r["duplicated"] for r in results)
    diff = sum(bool(r["differences"]) for r in results)
    print(
        f"- total: {made} kills over {studies} studies in {time.monotonic() - t_start:.0f} s; "
        f"lost {lost}, duplicated {dup}, re-run {rerun}, studies whose tables differ {diff}"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    os._exit(0)
