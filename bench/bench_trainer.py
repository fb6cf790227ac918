"""Epoch time of study.train.run_trial against a bare PyTorch loop (MNIST-1D, cnn1d, CPU).

Both sides train the same study.models network on the same tensors (prepare_data), with the same
batch size and AdamW. Two comparisons:

- "training only": the bare loop trains; run_trial is given a 1-sample validation split, so its
  per-epoch validation costs about nothing and its epoch time is the training loop plus bookkeeping
  (lr schedule, regularizer progress, loss/accuracy accumulation, decomposition terms).
- "with validation": the bare loop also scores the 800-sample validation split each epoch with the
  three metrics run_trial logs (accuracy, NLL, ECE); run_trial runs unchanged.

An epoch is the time between consecutive epoch-end stamps (run_trial: its report callback; bare loop:
the end of its epoch), both wall (perf_counter) and CPU (process_time, less sensitive to other
processes on a shared machine); the first epoch of each run drops out as warm-up; the figure is the
median over all epochs of all repeats, and the order of the runs alternates between repeats.

Usage: python bench/bench_trainer.py [--repeats 5] [--epochs 6] [--batch-size 32] [--threads 1]
       python bench/bench_trainer.py --acceptance   # `study trial` defaults, 30 epochs, test accuracy
       python bench/bench_trainer.py --acceptance --lr 1e-2 2e-2 --batch-size 32 64 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from study import data, metrics
from study.trial.config import TrialConfig
from study.trial.fit import PreparedData, build_model
from study.trial.run import prepare_data, run_trial


def _per_epoch(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(wall, cpu) seconds between consecutive epoch-end stamps: epoch 1 (warm-up) drops out."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:], strict=False)]


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def bare_epochs(cfg: TrialConfig, prep: PreparedData, *, validate: bool) -> list[tuple[float, float]]:
    """Per-epoch (wall, cpu) seconds of a plain loop: randperm, slice, forward, CE, backward, AdamW."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, prep.bundle)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y = prep.bundle.to_float(prep.x_train), prep.y_train
    x_val = prep.bundle.to_float(prep.x_val)
    gen = torch.Generator().manual_seed(cfg.seed)
    stamps = []
    for _ in range(cfg.train.epochs):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), cfg.train.batch_size):
            idx = order[i : i + cfg.train.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if validate:
            model.eval()
            with torch.no_grad():
                z = model(x_val)
            metrics.accuracy(z, prep.y_val), metrics.nll(z, prep.y_val), metrics.ece(z, prep.y_val)
        stamps.append(_stamp())
    return _per_epoch(stamps)


def trainer_epochs(cfg: TrialConfig, prep: PreparedData) -> list[tuple[float, float]]:
    """Per-epoch (wall, cpu) seconds of run_trial, stamped by its report callback (end of each epoch)."""
    stamps: list[tuple[float, float]] = []
    result = run_trial(cfg, lambda row: stamps.append(_stamp()), prepared=prep)
    assert result.status == "completed", result.status
    return _per_epoch(stamps)


def compare(cfg: TrialConfig, repeats: int) -> dict[str, float]:
    prep = prepare_data(cfg)
    # Training only: a 1-sample validation split makes run_trial's per-epoch validation negligible.
    prep_tiny_val = dataclasses.replace(prep, x_val=prep.x_val[:1], y_val=prep.y_val[:1])
    runs: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("bare", "trainer", "bare+val", "trainer+val")
    }
    for r in range(repeats):
        order = ["bare", "trainer", "bare+val", "trainer+val"]
        for name in order if r % 2 == 0 else order[::-1]:
            if name == "bare":
                runs[name] += bare_epochs(cfg, prep, validate=False)
            elif name == "bare+val":
                runs[name] += bare_epochs(cfg, prep, validate=True)
            elif name == "trainer":
                runs[name] += trainer_epochs(cfg, prep_tiny_val)
            else:
                runs[name] += trainer_epochs(cfg, prep)
    out = {}
    for k, v in runs.items():
        out[k] = statistics.median(w for w, _ in v)
        out[k + " cpu"] = statistics.median(c for _, c in v)
        # The fastest epoch is the one least disturbed by other processes on a shared machine.
        out[k + " min"] = min(w for w, _ in v)
    return out


def accuracy_runs(
    seeds: list[int], lrs: list[float] | None, batch_sizes: list[int] | None, wd: float
) -> None:
    """cnn1d on MNIST-1D for 30 epochs: clean test accuracy and wall time per (batch, lr, seed).

    Without lrs/batch_sizes it uses the `study trial` defaults (the acceptance command).
    """
    from study.spec import TrainSpec

    defaults = TrainSpec()  # what `study trial` uses when no option is given
    for bs in batch_sizes or [defaults.batch_size]:
        for lr in lrs or [defaults.lr]:
            for seed in seeds:
                train = TrainSpec(epochs=30, lr=lr, weight_decay=wd, batch_size=bs)
                cfg = TrialConfig(seed=seed, train=train, evaluate={})
                t0 = time.perf_counter()
                result = run_trial(cfg)
                print(
                    f"batch {bs} lr {lr:g} wd {wd:g} seed {seed}: test accuracy "
                    f"{result.metric('accuracy'):.3f}  train acc {result.epoch_rows[-1]['train_acc']:.3f}  "
                    f"wall {time.perf_counter() - t0:.1f} s"
                )


def _params(fn):  # noqa: ANN001, ANN202 - typer options live in the signature defaults
    import inspect

    return inspect.signature(fn).parameters.values()


LABELS = {"": "median wall", " cpu": "median cpu", " min": "min wall"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--acceptance", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, nargs="+", default=None, help="--acceptance: lr grid")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}")
    data.load_dataset("mnist1d")  # generate/cache once, outside the timings
    if args.acceptance:
        bs = args.batch_size if args.lr else None
        accuracy_runs(args.seeds, args.lr, bs, args.weight_decay)
        return
    for bs in args.batch_size:
        cfg = TrialConfig(train={"epochs": args.epochs, "batch_size": bs, "lr": 1e-2, "device": "cpu"})
        med = compare(cfg, args.repeats)
        for unit in ("", " cpu", " min"):
            times = "  ".join(
                f"{k} {1000 * med[k + unit]:.1f}" for k in ("bare", "trainer", "bare+val", "trainer+val")
            )
            print(f"batch {bs}: epoch ms ({LABELS[unit]})  {times}")
            print(
                f"batch {bs}: trainer/bare ({LABELS[unit]})  training only "
                f"{med['trainer' + unit] / med['bare' + unit]:.3f}  "
                f"with validation {med['trainer+val' + unit] / med['bare+val' + unit]:.3f}"
            )


if __name__ == "__main__":
    main()
