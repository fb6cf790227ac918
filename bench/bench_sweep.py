"""Sweep benchmarks (issue "The sweep"): pruning savings, orchestration overhead, quickstart wall time.

    python bench/bench_sweep.py pruning [SEEDS]  # epochs with vs without the pruner, same sampler seeds
    python bench/bench_sweep.py overhead [EPOCHS]  # smoke study vs the same trials back to back
    python bench/bench_sweep.py quickstart   # wall time of the README's main job

Results are printed as markdown lines; bench/bench_sweep.md records them with the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run(spec_path: Path, out: Path) -> float:
    from study.sweep.runner import run_study

    t0 = time.perf_counter()
    run_study(spec_path, out=out, quiet=True)
    return time.perf_counter() - t0


@contextlib.contextmanager
def _phase_clock() -> Iterator[dict[str, tuple[float, float]]]:
    """Wall-clock (time.time) start and end of init_ray, run_trials and shutdown while the block runs
    (the functions of study.sweep.tune wrapped in this process only), plus this process's CPU seconds
    ("driver_cpu": the driver's share of the 2 cores; Ray's workers are not its children, so theirs is not
    countable here).
    Wrapping needs study.sweep.tune (ray, ray.tune) imported first: "import_tune" is how long that took,
    which run_study would otherwise have spent inside the timed wall."""
    import resource

    t0 = time.perf_counter()
    from study.sweep import tune as tune_lib  # imported by run_study itself otherwise: timed apart

    clock: dict[str, Any] = {"import_tune": time.perf_counter() - t0}
    saved = {name: getattr(tune_lib, name) for name in ("init_ray", "run_trials", "shutdown")}

    def timed(name: str, fn: Any) -> Any:
        def inner(*args: Any, **kwargs: Any) -> Any:
            t0 = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[name] = (t0, time.time())

        return inner

    for name, fn in saved.items():
        setattr(tune_lib, name, timed(name, fn))
    me = resource.getrusage(resource.RUSAGE_SELF)
    try:
        yield clock
    finally:
        for name, fn in saved.items():
            setattr(tune_lib, name, fn)
        me2 = resource.getrusage(resource.RUSAGE_SELF)
        clock["driver_cpu"] = me2.ru_utime + me2.ru_stime - me.ru_utime - me.ru_stime


# The pruned arms compared with `none` (each a spec `search.pruner` block).
PRUNER_ARMS = {
    "median": {"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 2},
    "successive_halving": {"kind": "successive_halving", "min_resource": 2, "reduction_factor": 2},
}


def pruning(seeds: int = 3) -> None:
    """smoke.yaml at 10 epochs and 8 trials per cell: each pruner of PRUNER_ARMS vs none, for `seeds`
    sampler seeds (search.seed drives the sampler and the search trials' training in every arm)."""
    base = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    base["train"]["epochs"] = 10
    base["final"] = {"seeds": 1}
    base["evaluate"] = {}
    arms = {"none": {"kind": "none"}, **PRUNER_ARMS}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for arm, pruner in arms.items():
                name = f"prune-{arm}-{seed}".replace("_", "-")
                spec = dict(base, name=name)
                spec["search"] = dict(base["search"], trials_per_cell=8, seed=seed, pruner=pruner)
                path = Path(tmp) / f"{name}.yaml"
                path.write_text(yaml.safe_dump(spec))
                wall = _run(path, Path(tmp) / name)
                t = pd.read_parquet(Path(tmp) / name / "trials.parquet")
                search = t[t.phase == "search"]
                best = search.groupby("cell_id").best_value.max()
                rows.append(
                    {
                        "seed": seed,
                        "arm": arm,
                        "epochs": int(search.epochs.sum()),
                        "wall_s": wall,
                        **{c.split("/", 2)[2]: v for c, v in best.items()},
                    }
                )
    df = pd.DataFrame(rows).set_index(["arm", "seed"])
    cells = [c for c in df.columns if c not in ("epochs", "wall_s")]
    none = df.loc["none"]
    print(
        "| pruner | seed | search epochs (none) | saved | wall s (none) | best val. acc. minus none, points |"
    )
    print("|---|---|---|---|---|---|")
    for arm in PRUNER_ARMS:
        d = df.loc[arm]
        for seed in range(seeds):
            diffs = 100 * (d.loc[seed, cells] - none.loc[seed, cells])
            print(
                f"| {arm} | {seed} | {d.loc[seed, 'epochs']:.0f} ({none.loc[seed, 'epochs']:.0f}) | "
                f"{1 - d.loc[seed, 'epochs'] / none.loc[seed, 'epochs']:.1%} | "
                f"{d.loc[seed, 'wall_s']:.0f} ({none.loc[seed, 'wall_s']:.0f}) | "
                + ", ".join(f"{c} {v:+.2f}" for c, v in diffs.items())
                + " |"
            )
    print("\n| pruner | epochs saved (mean) | mean best diff per cell, points | cell x seed within 1 point |")
    print("|---|---|---|---|")
    for arm in PRUNER_ARMS:
        d = df.loc[arm]
        saved = 1 - d["epochs"].sum() / none["epochs"].sum()
        diffs = 100 * (d[cells] - none[cells])
        within = int((diffs.abs() <= 1.0).sum().sum())
        print(
            f"| {arm} | {saved:.1%} | "
            + ", ".join(f"{c} {v:+.2f}" for c, v in diffs.mean().items())
            + f" | {within} of {diffs.size} |"
        )
    # The noise floor: how far two unpruned searches that differ only in their seed land apart.
    spread = 100 * (none[cells].max() - none[cells].min())
    print(
        "\nnoise floor, unpruned searches across seeds (max - min of the best per cell, points): "
        + ", ".join(f"{c} {v:.2f}" for c, v in spread.items())
    )


BARE_PROGRAM = """
import json, sys, time
import torch
torch.set_num_threads(1)
from study.trial.config import TrialConfig
from study.trial.run import run_trial
for rec in json.loads(open(sys.argv[1]).read()):
    stop_at = len(rec["epoch_rows"]) if rec["status"] == "pruned" else None
    run_trial(TrialConfig.model_validate(dict(rec["config"], checkpoint_dir=None)),
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

    from study.sweep.records import Records
    from study.trial.config import TrialConfig
    from study.trial.run import run_trial

    torch.set_num_threads(1)
    spec = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    if epochs:
        spec["train"]["epochs"] = epochs
    if len(sys.argv) > 3:  # trial fusion: `overhead EPOCHS auto|K` packs the study's trials
        packed = sys.argv[3]
        spec["resources"]["trials_per_process"] = packed if packed == "auto" else int(packed)
    concurrency = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "smoke.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        out = Path(tmp) / "smoke"
        with _phase_clock() as clock:
            t_start = time.time()
            wall = _run(spec_path, out)
            t_end = time.time()
        wall += clock["import_tune"]  # as in earlier sessions: run_study imports the Ray module itself
        records = list(Records(out / "records").load_all("search").values())
        records += list(Records(out / "records").load_all("final").values())
        manifest = json.loads((out / "manifest.json").read_text())
        # Back to back in one process: each trial's config with exactly the epochs it ran in the sweep.
        t0 = time.perf_counter()
        for rec in records:
            cfg = dict(rec["config"], checkpoint_dir=None)
            stop_at = len(rec["epoch_rows"]) if rec["status"] == "pruned" else None
            run_trial(
                TrialConfig.model_validate(cfg), (lambda row, s=stop_at: s is not None and row["epoch"] >= s)
            )
        bare = time.perf_counter() - t0
        # Whole programs, each in a fresh interpreter: a second study run, then the bare loop over THAT
        # run's trials (pruning decisions depend on timing, so two runs may stop different trials).
        t0 = time.perf_counter()
        code = (
            "import sys; from study.sweep.runner import run_study as r; "
            "r(sys.argv[1], out=sys.argv[2], quiet=True)"
        )
        prog_out = Path(tmp) / "prog"
        subprocess.run(
            [sys.executable, "-c", code, str(spec_path), str(prog_out)],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        study_prog = time.perf_counter() - t0
        prog_records = list(Records(prog_out / "records").load_all("search").values())
        prog_records += list(Records(prog_out / "records").load_all("final").values())
        recs_path = Path(tmp) / "records.json"
        recs_path.write_text(json.dumps(prog_records))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", BARE_PROGRAM, str(recs_path)], check=True, cwd=ROOT)
        bare_prog = time.perf_counter() - t0
    first = min(r["started_at"] for r in records)
    last = max(r["ended_at"] for r in records)
    busy = sum(r["ended_at"] - r["started_at"] for r in records)
    span = last - first
    fixed = (first - t_start) + (t_end - last) + clock["import_tune"]
    print(
        f"epochs per trial {spec['train']['epochs']}; {len(records)} trials (planned {manifest['planned']}); "
        f"concurrency {concurrency}\n"
        f"(1) run_study wall {wall:.1f} s; bare loop in-process {bare:.1f} s; "
        f"ratio {wall / (bare / concurrency):.2f}\n"
        f"(2) whole programs: study {study_prog:.1f} s; bare {bare_prog:.1f} s; "
        f"ratio {study_prog / (bare_prog / concurrency):.2f}\n"
        f"(3) fixed {fixed:.1f} s (to first trial {first - t_start + clock['import_tune']:.1f} s, "
        f"after last {t_end - last:.1f} s); "
        f"trial span {span:.1f} s, slots busy {busy / (span * concurrency):.1%}; "
        f"span / (bare / concurrency) = {span / (bare / concurrency):.2f}\n"
        f"(3') to first trial: import of study.sweep.tune {clock['import_tune']:.2f} s, "
        f"before init_ray {clock['init_ray'][0] - t_start:.2f} s, init_ray "
        f"{clock['init_ray'][1] - clock['init_ray'][0]:.2f} s, then until run_trials "
        f"{clock['run_trials'][0] - clock['init_ray'][1]:.2f} s, run_trials start to first trial start "
        f"{first - clock['run_trials'][0]:.2f} s; after last: last trial end to run_trials return "
        f"{clock['run_trials'][1] - last:.2f} s, then to shutdown "
        f"{clock['shutdown'][0] - clock['run_trials'][1]:.2f} s, "
        f"shutdown {clock['shutdown'][1] - clock['shutdown'][0]:.2f} s, then to return "
        f"{t_end - clock['shutdown'][1]:.2f} s; driver CPU during run_study {clock['driver_cpu']:.1f} s; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def quickstart() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wall = _run(ROOT / "search_spaces" / "quickstart.yaml", Path(tmp) / "q")
        t = pd.read_parquet(Path(tmp) / "q" / "trials.parquet")
    print(f"quickstart wall {wall:.1f} s, {len(t)} trials ({(t.status == 'pruned').sum()} pruned)")


if __name__ == "__main__":
    arg = int(sys.argv[2]) if len(sys.argv) > 2 else None
    if sys.argv[1] == "overhead":
        overhead(arg)
    elif sys.argv[1] == "pruning":
        pruning(arg or 3)
    else:
        quickstart()
