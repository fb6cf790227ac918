"""Sweep benchmarks (issue "The sweep"): pruning savings, orchestration overhead, quickstart wall time.

    python bench/bench_sweep.py pruning      # epochs with vs without the pruner, same sampler seed
    python bench/bench_sweep.py overhead [EPOCHS]  # smoke study vs the same trials back to back
    python bench/bench_sweep.py quickstart   # wall time of the README's main job

Results are printed as markdown lines; bench/bench_sweep.md records them with the machine.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run(spec_path: Path, out: Path) -> float:
    from study.runner import run_study

    t0 = time.perf_counter()
    run_study(spec_path, out=out, quiet=True)
    return time.perf_counter() - t0


def pruning() -> None:
    base = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    base["train"]["epochs"] = 10
    base["search"]["trials_per_cell"] = 8
    base["final"] = {"seeds": 1}
    base["evaluate"] = {}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("median", "none"):
            spec = dict(base, name=f"prune-{kind}")
            spec["search"] = dict(
                base["search"], pruner={"kind": kind, "n_startup_trials": 2, "n_warmup_steps": 2}
            )
            path = Path(tmp) / f"{kind}.yaml"
            path.write_text(yaml.safe_dump(spec))
            wall = _run(path, Path(tmp) / kind)
            t = pd.read_parquet(Path(tmp) / kind / "trials.parquet")
            s = t[t.phase == "search"]
            results[kind] = {
                "wall_s": wall,
                "epochs": int(s.epochs.sum()),
                "best": s.groupby("cell_id").best_value.max().to_dict(),
            }
    saved = 1 - results["median"]["epochs"] / results["none"]["epochs"]
    diffs = {c: results["median"]["best"][c] - results["none"]["best"][c] for c in results["none"]["best"]}
    print("| pruner | search epochs | wall s |\n|---|---|---|")
    for k, r in results.items():
        print(f"| {k} | {r['epochs']} | {r['wall_s']:.0f} |")
    print(f"\nepochs saved by pruning: {saved:.1%}")
    print(
        "best validation accuracy per cell, median - none (points): "
        + ", ".join(f"{c.split('/', 2)[2]} {100 * d:+.2f}" for c, d in diffs.items())
    )
    print(json.dumps(results))


BARE_PROGRAM = """
import json, sys, time
import torch
torch.set_num_threads(1)
from study.train import TrialConfig, run_trial
for rec in json.loads(open(sys.argv[1]).read()):
    stop_at = len(rec["epoch_rows"]) if rec["status"] == "pruned" else None
    run_trial(TrialConfig(**dict(rec["config"], checkpoint_dir=None)),
              lambda row, s=stop_at: s is not None and row["epoch"] >= s)
"""


def overhead(epochs: int | None = None) -> None:
    """The smoke study (optionally with `epochs` per trial) vs the same trials back to back.

    Three readings: (1) run_study's wall vs the trials back to back in this process (imports and the
    dataset load not timed) / concurrency; (2) whole programs: a fresh `python` running run_study vs a
    fresh `python` running the bare loop (both pay their imports and dataset load) / concurrency;
    (3) the split of (1) into fixed costs (start until the first trial starts + last trial's end until
    run_study returns) and the trial span, whose per-slot idle share is the per-trial overhead.
    """
    import subprocess

    import torch

    from study.train import TrialConfig, run_trial
    from study.tune import Records

    torch.set_num_threads(1)
    spec = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    if epochs:
        spec["train"]["epochs"] = epochs
    concurrency = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "smoke.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        out = Path(tmp) / "smoke"
        t_start = time.time()
        wall = _run(spec_path, out)
        t_end = time.time()
        records = list(Records(out / "records").load_all("search").values())
        records += list(Records(out / "records").load_all("final").values())
        manifest = json.loads((out / "manifest.json").read_text())
        # Back to back in one process: each trial's config with exactly the epochs it ran in the sweep.
        t0 = time.perf_counter()
        for rec in records:
            cfg = dict(rec["config"], checkpoint_dir=None)
            stop_at = len(rec["epoch_rows"]) if rec["status"] == "pruned" else None
            run_trial(TrialConfig(**cfg), (lambda row, s=stop_at: s is not None and row["epoch"] >= s))
        bare = time.perf_counter() - t0
        # Whole programs, each in a fresh interpreter.
        recs_path = Path(tmp) / "records.json"
        recs_path.write_text(json.dumps(records))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", BARE_PROGRAM, str(recs_path)], check=True, cwd=ROOT)
        bare_prog = time.perf_counter() - t0
        t0 = time.perf_counter()
        code = (
            "import sys; from study.runner import run_study as r; r(sys.argv[1], out=sys.argv[2], quiet=True)"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(spec_path), str(Path(tmp) / "prog")],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        study_prog = time.perf_counter() - t0
    first = min(r["started_at"] for r in records)
    last = max(r["ended_at"] for r in records)
    busy = sum(r["ended_at"] - r["started_at"] for r in records)
    span = last - first
    fixed = (first - t_start) + (t_end - last)
    print(
        f"epochs per trial {spec['train']['epochs']}; {len(records)} trials (planned {manifest['planned']}); "
        f"concurrency {concurrency}\n"
        f"(1) run_study wall {wall:.1f} s; bare loop in-process {bare:.1f} s; "
        f"ratio {wall / (bare / concurrency):.2f}\n"
        f"(2) whole programs: study {study_prog:.1f} s; bare {bare_prog:.1f} s; "
        f"ratio {study_prog / (bare_prog / concurrency):.2f}\n"
        f"(3) fixed {fixed:.1f} s (to first trial {first - t_start:.1f} s, after last {t_end - last:.1f} s); "
        f"trial span {span:.1f} s, slots busy {busy / (span * concurrency):.1%}; "
        f"span / (bare / concurrency) = {span / (bare / concurrency):.2f}"
    )


def quickstart() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wall = _run(ROOT / "search_spaces" / "quickstart.yaml", Path(tmp) / "q")
        t = pd.read_parquet(Path(tmp) / "q" / "trials.parquet")
    print(f"quickstart wall {wall:.1f} s, {len(t)} trials ({(t.status == 'pruned').sum()} pruned)")


if __name__ == "__main__":
    if sys.argv[1] == "overhead":
        overhead(int(sys.argv[2]) if len(sys.argv) > 2 else None)
    else:
        {"pruning": pruning, "quickstart": quickstart}[sys.argv[1]]()
