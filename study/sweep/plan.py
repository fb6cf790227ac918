"""`study validate`: the plan of a spec (cells, trials, epoch budget, resources)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from study.spec import StudySpec
from study.sweep.cells import expand_cells, planned_counts


def print_plan(spec: StudySpec, console: Console) -> dict[str, int]:
    cells = expand_cells(spec)
    counts = planned_counts(spec, cells)
    final_epochs = spec.final.epochs or spec.train.epochs
    budget = counts["search"] * spec.train.epochs + counts["final"] * final_epochs
    table = Table(title=f"study {spec.name}: {len(cells)} cells", show_lines=False)
    table.add_column("cell")
    table.add_column("searched", overflow="fold")
    table.add_column("fixed", overflow="fold")
    for c in cells:
        table.add_row(
            c.cell_id, ", ".join(c.searched) or "-", ", ".join(f"{k}={v}" for k, v in c.fixed.items())
        )
    console.print(table)
    r = spec.resources
    console.print(
        f"search: {counts['search']} trials x <= {spec.train.epochs} epochs "
        f"({spec.search.sampler} sampler, {spec.search.pruner.kind} pruner, metric {spec.search.metric})\n"
        f"final:  {counts['final']} trials ({_seeds_text(spec)} per cell) x {final_epochs} epochs\n"
        f"budget: at most {budget} epochs; "
        f"resources per trial: {r.cpus_per_trial:g} CPU, {r.gpus_per_trial:g} GPU",
        highlight=False,
    )
    return {**counts, "cells": len(cells), "epoch_budget": budget}


def _seeds_text(spec: StudySpec) -> str:
    seeds = spec.final.seeds
    if isinstance(seeds, int):
        return f"{seeds} seeds"
    return f"{seeds.min}-{seeds.max} seeds, added until the comparison with {seeds.reference} is decided"
