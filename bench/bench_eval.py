"""Cost of the full final evaluation relative to training one trial (target: < 25% at smoke settings).

    python bench/bench_eval.py [smoke|quickstart]

Trains one final-phase trial of the spec's first non-ce cell with its `evaluate:` block, timing the
training (epochs) and the evaluation (clean metrics, temperature scaling, features, memorisation,
attacks, corruptions) separately, in one process, after a warm-up run.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from study.spec import load_spec
from study.sweep.cells import expand_cells
from study.trial.evaluate import evaluate_model
from study.trial.fit import resolve_device
from study.trial.run import prepare_data, train_trial

ROOT = Path(__file__).resolve().parents[1]


def main(name: str) -> None:
    torch.set_num_threads(1)
    spec = load_spec(ROOT / "search_spaces" / f"{name}.yaml")
    cell = next(c for c in expand_cells(spec) if c.regularizer != "ce" and c.noise.kind != "none")
    params = {k: (v.low + v.high) / 2 for k, v in cell.searched.items()}
    cfg = cell.trial_config(spec, params, seed=1, phase="final")
    prep = prepare_data(cfg)
    device = resolve_device(cfg.train.device)
    train_s, eval_s = [], []
    for rep in range(4):
        t0 = time.perf_counter()
        _, fitted = train_trial(cfg.model_copy(update={"evaluate": None}), prepared=prep)
        t1 = time.perf_counter()
        evaluate_model(fitted.model, prep, cfg, device)
        t2 = time.perf_counter()
        if rep:  # the first repetition warms up imports and allocator
            train_s.append(t1 - t0)
            eval_s.append(t2 - t1)
    tr, ev = statistics.median(train_s), statistics.median(eval_s)
    print(
        f"{name}: cell {cell.cell_id}, {cfg.train.epochs} epochs; training {tr:.2f} s, evaluation {ev:.2f} s "
        f"(median of {len(train_s)}); evaluation / training = {ev / tr:.1%}; evaluate block {cfg.evaluate}"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smoke")
