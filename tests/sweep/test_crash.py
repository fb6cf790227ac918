"""A few random instants of bench/bench_crash.py in CI: the driver of a small packed study with a post
phase is SIGKILLed twice at random instants and resumed; no trial is lost, duplicated or re-run (the
bench makes 50 kills and compares the tables with an uninterrupted run's: bench/bench_crash.md)."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_crash  # noqa: E402

pytestmark = pytest.mark.slow

SPEC = (
    bench_crash.SPEC.replace("trials_per_cell: 3", "trials_per_cell: 2")
    .replace("grid: [0.003, 0.01, 0.02]", "grid: [0.01, 0.02]")
    .replace("seeds: 2", "seeds: 1")
    .replace("epochs: 3", "epochs: 2")
)


def test_sigkill_at_random_instants_loses_duplicates_and_reruns_nothing(tmp_path):
    seed = int(time.time())
    rng = random.Random(seed)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    seen: dict[str, tuple] = {}
    instants, rerun, resume = [], 0, False
    for kill in (True, True, False):
        instant = rng.uniform(0.0, 20.0) if kill else None
        completed, _ = bench_crash.run(spec, out, resume=resume, kill_after=instant)
        now = bench_crash.ended_records(out) if out.exists() else {}
        rerun += sum(1 for k, v in seen.items() if now.get(k) != v)
        seen.update(now)
        if completed:
            break
        instants.append(round(instant, 2))
        resume = (out / "manifest.json").exists()
    why = f"seed {seed}, kills at {instants} s"
    assert rerun == 0, why
    trials = pd.read_parquet(out / "trials.parquet")
    # 2 cells x (2 search + 1 final), each once and none failed.
    assert len(trials) == 6 and not trials.trial_id.duplicated().any(), why
    assert trials.groupby("phase").size().to_dict() == {"final": 2, "search": 4}, why
    assert set(trials.status) == {"completed"}, why
    evals = pd.read_parquet(out / "evals.parquet")
    assert "transfer" in set(evals.condition), why  # the post phase ran
