"""Sweep benchmarks (issue "The sweep"): pruning savings, orchestration overhead, quickstart wall time.

    python bench/bench_sweep.py pruning      # epochs with vs without the pruner, same sampler seed
    python bench/bench_sweep.py overhead     # smoke study wall vs the same trials back to back / concurrency
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


def overhead() -> None:
    import torch

    from study.train import TrialConfig, run_trial
    from study.tune import Records

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "smoke"
        wall = _run(ROOT / "search_spaces" / "smoke.yaml", out)
        records = list(Records(out / "records").load_all("search").values())
        records += list(Records(out / "records").load_all("final").values())
        manifest = json.loads((out / "manifest.json").read_text())
        # Back to back in one process: each trial's config with exactly the epochs it ran in the sweep.
        t0 = time.perf_counter()
        for rec in records:
            cfg = dict(rec["config"], checkpoint_dir=None, epochs=rec["config"]["epochs"])
            ran = len(rec["epoch_rows"])
            stop_at = ran if rec["status"] == "pruned" else None
            run_trial(TrialConfig(**cfg), (lambda row, s=stop_at: s is not None and row["epoch"] >= s))
        bare = time.perf_counter() - t0
    concurrency = os.cpu_count() or 1
    print(
        f"smoke study wall {wall:.1f} s ({len(records)} trials, manifest planned {manifest['planned']}); "
        f"bare loop {bare:.1f} s; concurrency {concurrency}; "
        f"overhead ratio wall / (bare / concurrency) = {wall / (bare / concurrency):.2f}"
    )


def quickstart() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wall = _run(ROOT / "search_spaces" / "quickstart.yaml", Path(tmp) / "q")
        t = pd.read_parquet(Path(tmp) / "q" / "trials.parquet")
    print(f"quickstart wall {wall:.1f} s, {len(t)} trials ({(t.status == 'pruned').sum()} pruned)")


if __name__ == "__main__":
    {"pruning": pruning, "overhead": overhead, "quickstart": quickstart}[sys.argv[1]]()
