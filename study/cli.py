"""The `study` command line: run, trial, validate, report, query, ls.

Exit codes: 0 ok, 1 runtime failure, 2 bad input (spec, arguments, results dir).
"""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Label-smoothing-family regularizer studies: sweep, evaluate, report.",
)
err = Console(stderr=True)


def _not_built(command: str) -> None:
    err.print(f"[red]study {command}: not built yet[/red]")
    raise typer.Exit(1)


@app.command()
def run() -> None:
    """Run a study spec: search phase, final phase, report."""
    _not_built("run")


@app.command()
def trial() -> None:
    """Run one trial and print its metrics."""
    _not_built("trial")


@app.command()
def validate() -> None:
    """Validate a spec and print the plan (cells, trials, epoch budget)."""
    _not_built("validate")


@app.command()
def report() -> None:
    """Render the report of a results directory."""
    _not_built("report")


@app.command()
def query() -> None:
    """Run SQL (DuckDB) over a results directory's Parquet tables."""
    _not_built("query")


@app.command("ls")
def ls_() -> None:
    """List the studies found under a directory and their status."""
    _not_built("ls")


if __name__ == "__main__":
    app()
