"""`study trial`: one trial from the command line, with a per-epoch progress bar and a metrics table."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from study.trial.config import TrialConfig


def parse_noise(text: str) -> tuple[str, float, str | None]:
    """'none' | 'KIND:RATE' | 'adversarial-MODE:RATE' -> (kind, rate, mode)."""
    if text == "none":
        return "none", 0.0, None
    kind, sep, rate = text.partition(":")
    if not sep:
        raise ValueError(f"--noise must be KIND:RATE (e.g. symmetric:0.4) or none, but got {text!r}")
    mode = None
    if "-" in kind:
        kind, mode = kind.split("-", 1)
    try:
        return kind, float(rate), mode
    except ValueError:
        raise ValueError(f"--noise rate must be a number in [0, 1], but got {rate!r}") from None


def parse_params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param must be key=value, but got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise ValueError(
                f"--param {key}: {value!r} is not a value ({problem}); give a number, true/false or a string"
            ) from None
    return out


def _parse_device(text: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda[:N]' | 'mps' -> a device that exists here, else ValueError."""
    from study.trial.fit import resolve_device

    try:
        device = resolve_device(text)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, but got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text!r} asks for CUDA, but no CUDA device is available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text!r} asks for MPS, but no MPS device is available here")
    return device


SMALL_MODEL_PARAMS = 1_000_000


def _limit_cpu_threads(device: torch.device, n_params: int) -> None:
    """One intra-op thread for small models on the CPU unless OMP_NUM_THREADS says otherwise.

    A small model's ops are too short to split across threads, and on a loaded machine spinning
    OpenMP workers cost more than they give: cnn1d on MNIST-1D ran 3 epochs in 29 s with 2 threads
    and in 4.6 s with 1 on 2 busy cores (bench/bench_trainer.md). Ray trials get OMP_NUM_THREADS
    from Ray, so this only changes `study trial`.
    """
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and n_params < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)


def trial_config_from_options(
    *,
    dataset: str = "mnist1d",
    model: str = "cnn1d",
    regularizer: str = "ce",
    params: list[str] = (),  # type: ignore[assignment]
    noise: str = "none",
    seed: int = 0,
    noise_seed: int = 0,
    root: str | None = None,
    checkpoint_dir: Path | None = None,
    **train: Any,
) -> TrialConfig:
    """The TrialConfig of `study trial`: the options given, the spec's defaults for the rest.

    Built like a final trial of a one-cell spec (full evaluation with the default ``evaluate:`` block,
    model kept when a checkpoint dir is given). ValueError (one line) on any bad option.
    """
    from pydantic import ValidationError

    from study import data, models, regularizers
    from study import noise as noise_lib
    from study.spec import DatasetSpec, EvaluateSpec, ModelSpec, NoiseSetting, TrainSpec
    from study.trial.config import RegularizerSetting, TrialConfig

    if train.get("device") is not None:
        _parse_device(train["device"])  # a device that exists here, else a one-line ValueError
    reg_params = parse_params(list(params))
    regularizers.validate_params(regularizer, reg_params)
    kind, rate, mode = parse_noise(noise)
    noise_lib.validate_noise(kind, rate, mode=mode)
    train = {k: v for k, v in train.items() if v is not None}
    if train.get("optimizer", "adamw") not in ("adamw", "sgd"):
        raise ValueError(f"--optimizer must be one of adamw, sgd, but got {train['optimizer']!r}")
    if dataset not in data.list_datasets():
        raise ValueError(f"unknown dataset {dataset!r} (allowed: {', '.join(data.list_datasets())})")
    if model not in models.list_models() and not model.startswith("tv:"):
        raise ValueError(f"unknown model {model!r} (allowed: {', '.join(models.list_models())}, tv:<name>)")
    try:
        return TrialConfig(
            dataset=DatasetSpec(name=dataset, root=root),
            model=ModelSpec(name=model),
            regularizer=RegularizerSetting(name=regularizer, params=reg_params),
            noise=NoiseSetting(kind=kind, rate=rate, mode=mode),
            noise_seed=noise_seed,
            seed=seed,
            train=TrainSpec(**train),
            evaluate=EvaluateSpec(),
            checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
            save_model=True,
        )
    except ValidationError as exc:
        from study.spec import error_message, loc_path

        err = exc.errors()[0]
        loc = [p for p in loc_path(err) if isinstance(p, str)]
        option = "--" + loc[-1].replace("_", "-") if loc else "option"
        raise ValueError(f"{option}: {error_message(err)}") from None


def run_trial_command(
    *,
    dataset: str,
    model: str,
    regularizer: str,
    params: list[str],
    noise: str,
    seed: int,
    noise_seed: int,
    root: str | None,
    checkpoint_dir: Path | None,
    as_json: bool,
    on_bad_input: Callable[[str], None],
    **train: Any,
) -> None:
    from study import data
    from study.trial.fit import build_model
    from study.trial.run import prepare_data

    # Everything that can be wrong with the input is checked before training starts (exit 2).
    try:
        cfg = trial_config_from_options(
            dataset=dataset,
            model=model,
            regularizer=regularizer,
            params=params,
            noise=noise,
            seed=seed,
            noise_seed=noise_seed,
            root=root,
            checkpoint_dir=checkpoint_dir,
            **train,
        )
        dev = _parse_device(cfg.train.device)
        bundle = data.load_dataset(dataset, root=root)
        n_params = sum(p.numel() for p in build_model(cfg, bundle).parameters())
    except (ValueError, ImportError) as exc:  # ImportError: an optional extra (digits: scikit-learn)
        on_bad_input(str(exc).splitlines()[0])
        return
    except FileNotFoundError as exc:
        # `study trial` has no --download flag: say how to fetch the files from the command line.
        hint = (
            f' (to download: python -c "from study.data import load_dataset; '
            f"load_dataset('{dataset}', root={root!r}, download=True)\")"
        )
        on_bad_input(str(exc).splitlines()[0] + hint)
        return
    _limit_cpu_threads(dev, n_params)
    console = Console(stderr=as_json)
    result = _train_with_progress(cfg, prepare_data(cfg, bundle), console, quiet=as_json)
    summary = _summary(cfg, result)
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        title = f"{dataset} / {model} / {regularizer} / noise {noise}  ({result.status})"
        console.print(_summary_table(summary, title))
    if result.status != "completed":
        raise typer.Exit(1)


def _train_with_progress(cfg: TrialConfig, prepared: Any, console: Console, *, quiet: bool) -> Any:
    """run_trial with a per-epoch progress bar (loss, validation accuracy) unless `quiet`."""
    from study.trial.run import run_trial

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )
    with progress:
        name = f"{cfg.model.name}/{cfg.regularizer.name}"
        task = progress.add_task(name, total=cfg.train.epochs, info="")

        def report(row: dict[str, Any]) -> bool:
            info = f"loss {row['train_loss']:.3f} val acc {row['val_accuracy']:.3f}"
            progress.update(task, completed=row["epoch"], info=info)
            return False

        result = run_trial(cfg, report, prepared=prepared)
        progress.update(task, completed=result.epochs_run)
    return result


def _summary(cfg: TrialConfig, result: Any) -> dict[str, Any]:
    return {
        "status": result.status,
        "epochs": result.epochs_run,
        "best_val_accuracy": result.best_value,
        "realized_noise_rate": result.realized_noise_rate,
        "wall_s": round(result.wall_s, 3),
        "device": result.device,
        "final_train_acc": result.epoch_rows[-1]["train_acc"] if result.epoch_rows else None,
        "metrics": {
            r["metric"]: r["value"]
            for r in result.eval_rows
            if r["condition"] == "clean" and not r["metric"].startswith("bin_")
        },
        "config": cfg.model_dump(mode="json"),
    }


def _summary_table(summary: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("final_train_acc", "best_val_accuracy", "realized_noise_rate", "wall_s"):
        if summary[k] is not None:
            table.add_row(k, f"{summary[k]:.4f}" if isinstance(summary[k], float) else str(summary[k]))
    for k, v in summary["metrics"].items():
        table.add_row(k, f"{v:.4f}")
    return table
