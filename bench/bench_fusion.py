"""Trial fusion: trials/hour of a spec's trial mix, packed K per process vs one trial per process.

The mix: `--trials` search-phase trials drawn from the spec's cells (round robin over a seeded shuffle
of its cells; hyperparameters drawn uniformly / log-uniformly from each cell's search space with a
seeded generator), each trained for `--epochs` epochs without pruning (so every arm trains exactly the
same trials to the end). Arms, each on a pool of `--procs` worker processes with one torch thread each
(what Ray gives a trial with cpus_per_trial 1):

- alone: one trial per task, ``run_trial`` (today's one trial per process);
- K = 4, 8, 16: packs of up to K trials sharing a model (``pack_key``) per task, ``run_pack``.

Workers are started and have imported torch and loaded the dataset before the clock starts; noise that
needs out-of-fold reference probabilities (adversarial) is prepared once in the parent (disk cache).
Trials/hour = trials / wall of the whole arm. "Same results": per trial, |best validation value of the
arm - alone| (max and mean); the "seed noise" row is the same for the same trials alone with other
training seeds (+1000): the scale a difference has to stay under to be noise.

Usage: python bench/bench_fusion.py [--spec search_spaces/quickstart.yaml] [--trials 32] [--epochs 4]
       [--ks 4 8 16] [--procs 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from study.spec import load_spec
from study.sweep.cells import expand_cells
from study.sweep.optuna_cells import distributions
from study.trial.config import TrialConfig


def _draw(dist: Any, rng: random.Random) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return rng.choice(dist.choices)
    if isinstance(dist, IntDistribution):
        return rng.randint(dist.low, dist.high)
    assert isinstance(dist, FloatDistribution)
    if dist.log:
        return math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
    return rng.uniform(dist.low, dist.high)


def trial_mix(
    spec_path: Path, n: int, epochs: int, seed: int, seed_offset: int = 0
) -> list[tuple[str, TrialConfig]]:
    """`n` search trials of the spec's cells with drawn hyperparameters, `epochs` epochs each."""
    spec = load_spec(spec_path)
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": epochs})})
    rng = random.Random(seed)
    cells = expand_cells(spec)
    rng.shuffle(cells)
    mix = []
    for i in range(n):
        cell = cells[i % len(cells)]
        params = {name: _draw(d, rng) for name, d in distributions(cell).items()}
        cfg = cell.trial_config(spec, params, seed=spec.search.seed + i + seed_offset, phase="search")
        mix.append((f"{cell.cell_id}#{i}", cfg))
    return mix


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _warm(cfg_json: dict[str, Any]) -> int:
    from study.trial.run import load_bundle

    load_bundle(TrialConfig.model_validate(cfg_json))
    time.sleep(0.5)  # keep this worker busy so that the pool starts (and warms) all of them
    return os.getpid()


def _alone(key: str, cfg_json: dict[str, Any]) -> dict[str, float | None]:
    from study.trial.run import run_trial

    return {key: run_trial(TrialConfig.model_validate(cfg_json)).best_value}


def _packed(members: list[tuple[str, dict[str, Any]]]) -> dict[str, float | None]:
    from study.trial.run import run_pack

    results = run_pack([(k, TrialConfig.model_validate(c)) for k, c in members])
    return {k: r.best_value for k, r in results.items()}


def packs(mix: list[tuple[str, TrialConfig]], k: int) -> list[list[tuple[str, dict[str, Any]]]]:
    """Chunks of up to k trials that can share a pack (same pack_key), in mix order."""
    from study.trial.pack import pack_key

    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, cfg in mix:
        groups.setdefault(pack_key(cfg), []).append((key, cfg.model_dump(mode="json")))
    return [g[i : i + k] for g in groups.values() for i in range(0, len(g), k)]


def run_arm(mix: list[tuple[str, TrialConfig]], k: int | None, procs: int) -> tuple[float, dict[str, Any]]:
    """(wall seconds, best value per trial) of one arm on a fresh, warmed-up pool of `procs` workers."""
    with ProcessPoolExecutor(procs, initializer=_init_worker) as pool:
        pids = set(pool.map(_warm, [mix[0][1].model_dump(mode="json")] * (procs * 4)))
        assert len(pids) == procs, f"warm-up reached {len(pids)} of {procs} workers"
        t0 = time.perf_counter()
        if k is None:
            futures = [pool.submit(_alone, key, cfg.model_dump(mode="json")) for key, cfg in mix]
        else:
            futures = [pool.submit(_packed, chunk) for chunk in packs(mix, k)]
        values: dict[str, Any] = {}
        for f in futures:
            values.update(f.result())
        return time.perf_counter() - t0, values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=Path("search_spaces/quickstart.yaml"))
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    mix = trial_mix(args.spec, args.trials, args.epochs, args.seed)
    from study.trial.run import prepare_data

    for _, cfg in mix:  # OOF references of adversarial noise: computed once, cached on disk
        prepare_data(cfg)
    print(
        f"{args.spec} mix: {len(mix)} search trials x {args.epochs} epochs, "
        f"{args.procs} processes x 1 thread; "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
    )
    wall_alone, alone = run_arm(mix, None, args.procs)
    print("| arm | wall s | trials/hour | speed-up | max abs diff best value | mean abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| alone | {wall_alone:.1f} | {len(mix) / wall_alone * 3600:.0f} | 1.00 | - | - |")

    def diffs(values: dict[str, Any]) -> list[float]:
        return [abs(values[key] - alone[key]) for key, _ in mix if None not in (values[key], alone[key])]

    for k in args.ks:
        wall, values = run_arm(mix, k, args.procs)
        d = diffs(values)
        print(
            f"| K={k} | {wall:.1f} | {len(mix) / wall * 3600:.0f} | {wall_alone / wall:.2f} | "
            f"{max(d):.4f} | {statistics.mean(d):.5f} |"
        )
    reseeded = trial_mix(args.spec, args.trials, args.epochs, args.seed, seed_offset=1000)
    _, values = run_arm(reseeded, None, args.procs)  # same keys, cells and draws: other training seeds
    d = diffs(values)
    print(f"| seed noise (alone, seeds +1000) | - | - | - | {max(d):.4f} | {statistics.mean(d):.5f} |")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
