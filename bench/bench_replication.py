"""Do a study's verdicts replicate? Runs one spec with N study seeds (independent replications of the
whole study: sampler, training, noise and split randomness) and compares what each run concludes.

    python bench/bench_replication.py SPEC --runs N [--out DIR] [--first-seed S]

Each run is `study run SPEC --seed S --out DIR/seed-S` (a run already complete there is reused). For
every (setting, condition, metric, pair of regularizers) the verdicts of the runs are listed
(reports/verdicts.py: better / worse / equivalent / undecided, all pairs, Holm over the pairs of a
setting and metric); a contradiction is "better" in one run and "worse" or "equivalent" in another
(or "worse" against "equivalent"). Prints markdown; bench/bench_replication.md records the results with
the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from reports.compare import GROUP, compare, per_seed
from study import vocabulary as vocab

STUDY_BIN = str(Path(sys.executable).with_name("study"))
# The comparisons the report's findings make: clean-test accuracy and calibration, accuracy under each
# attack and corruption mean, memorisation, geometry, distillation.
METRICS = {"accuracy", "ece", "nll", "memorisation_rate", "r2", "student_accuracy"}


def run_seed(spec: Path, out: Path, seed: int) -> float:
    """`study run` with this study seed (skipped when `out` holds the completed run); wall seconds."""
    manifest = out / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("status") == "completed":
        return float("nan")
    cmd = [STUDY_BIN, "run", str(spec), "--seed", str(seed), "--out", str(out), "--quiet", "--no-report"]
    if out.exists():
        cmd.append("--resume")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with (out.parent / f"{out.name}.log").open("a") as log:  # the run's lines, apart from the table
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def verdicts_of(out: Path) -> pd.DataFrame:
    """Every pairwise verdict of one finished run: one row per (setting, condition, severity, metric,
    a, b) with a < b alphabetically."""
    trials = pd.read_parquet(out / "trials.parquet")
    evals = pd.read_parquet(out / "evals.parquet")
    evals = evals[(evals["split"].isin(["test", "train"])) & evals["metric"].isin(METRICS)]
    comp = compare(per_seed(trials, evals), reference=None)
    comp = comp[comp["regularizer"] < comp["reference"]].assign(verdict=lambda c: c["verdict_pairs"])
    return comp[[*GROUP, "condition", "severity", "metric", "regularizer", "reference", "verdict", "diff"]]


def contradiction(words: list[str]) -> bool:
    decided = set(words) - {"undecided"}
    return len(decided) > 1  # better/worse/equivalent (or higher/lower) disagree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("results/replication"))
    args = ap.parse_args()
    seeds = list(range(args.first_seed, args.first_seed + args.runs))
    frames, walls = [], {}
    for seed in seeds:
        out = args.out / f"seed-{seed}"
        walls[seed] = run_seed(args.spec, out, seed)
        frames.append(verdicts_of(out).assign(run=seed))
    table = pd.concat(frames, ignore_index=True)
    key = [*GROUP, "condition", "severity", "metric", "regularizer", "reference"]
    table["severity"] = table["severity"].fillna(-1)
    wide = table.pivot_table(index=key, columns="run", values="verdict", aggfunc="first").reset_index()
    wide["contradiction"] = [contradiction(list(r)) for r in wide[seeds].itertuples(index=False)]
    decided = (table["verdict"] != "undecided").mean()
    print(f"## {args.spec} - {args.runs} study seeds ({', '.join(map(str, seeds))})\n")
    for seed in seeds:
        print(
            f"- seed {seed}: wall {walls[seed]:.0f} s"
            if walls[seed] == walls[seed]
            else f"- seed {seed}: reused"
        )
    print(f"- comparisons per run: {len(wide)}; share decided (not undecided): {decided:.1%}")
    print(f"- contradictions: {int(wide['contradiction'].sum())}\n")
    shown = wide[(wide[seeds] != "undecided").any(axis=1)].copy()
    shown["pair"] = [
        f"{vocab.short_name(a)} vs {vocab.short_name(b)}"
        for a, b in zip(shown["regularizer"], shown["reference"], strict=True)
    ]
    severity = [f" s{v:g}" if v != -1 else "" for v in shown["severity"]]
    shown["where"] = shown["noise_setting"] + " " + shown["condition"] + severity
    cols = ["where", "metric", "pair", *seeds, "contradiction"]
    print("Decided in at least one run:\n")
    print(_markdown(shown[cols]) if len(shown) else "(none)")


def _markdown(frame: pd.DataFrame) -> str:
    rows = [[str(c) for c in frame.columns], ["---"] * frame.shape[1]]
    rows += [[str(v) for v in r] for r in frame.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


if __name__ == "__main__":
    main()
