"""The `study` command line: run, trial, validate, report, query, ls, dashboard.

Exit codes: 0 ok, 1 runtime failure, 2 bad input (spec, arguments, results dir).
"""

from __future__ import annotations

import faulthandler
import signal
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Label-smoothing-family regularizer studies: sweep, evaluate, report.",
)
err = Console(stderr=True)
if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints every thread's stack: why a run is stuck
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def _bad_input(message: str) -> NoReturn:
    """One line, exit 2. The message is plain text (values from the spec or the command line such as
    '[/bold]' or ':smile:' are shown as they are, never read as rich markup or emoji codes)."""
    from rich.text import Text

    err.print(Text.assemble(("error:", "red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Study spec (YAML)."),
    out: Path | None = typer.Option(None, "--out", help="Results directory (default results/<name>)."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: local Ray)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted study in --out."),
    max_concurrent: int | None = typer.Option(None, "--max-concurrent", min=1, help="Trials at once."),
    quiet: bool = typer.Option(False, "--quiet", help="Plain log lines instead of the live view."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the plots and the report at the end."),
    storage: str | None = typer.Option(
        None, "--storage", help="Mirror results to s3://bucket/prefix or a shared path (and resume from it)."
    ),
    seed: int | None = typer.Option(
        None, "--seed", min=0, max=2**32 - 1, help="Study seed (overrides the spec's `seed:`): a replication."
    ),
) -> None:
    """Run a study spec: search phase, final phase, report."""
    from study.spec import SpecError
    from study.sweep.records import DiskFull, PhaseFailed
    from study.sweep.runner import RunError, run_study

    try:
        out_dir = run_study(
            spec,
            out=out,
            address=address,
            resume=resume,
            max_concurrent=max_concurrent,
            quiet=quiet,
            storage=storage,
            seed=seed,
        )
    except (SpecError, RunError) as exc:
        _bad_input(str(exc))
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: continue with --resume[/yellow]")
        raise typer.Exit(130) from None
    except (DiskFull, PhaseFailed) as exc:
        from rich.text import Text

        then = "free space, then continue with --resume" if isinstance(exc, DiskFull) else "see records/"
        msg = f" {exc} (manifest: failed); {then}"
        err.print(Text.assemble(("error:", "red"), msg), highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if not no_report:
        from rich.markup import escape

        from reports.build import load_study
        from reports.plots import write_plots

        try:  # the run's figures (a report writes none); a figure that fails must not hide the findings
            write_plots(load_study(out_dir), out_dir / "plots")
        except Exception as exc:
            err.print(
                f"[red]error:[/red] plots: {escape(type(exc).__name__ + ': ' + str(exc))}", soft_wrap=True
            )
        report(out_dir, fmt="rich", plots=None, no_plots=False, full=False, reference="ce", all_pairs=False,
               compare=None)  # fmt: skip
        if storage:
            from study.sweep.runner import sync_storage

            sync_storage(storage, out_dir)


@app.command()
def trial(
    dataset: str = typer.Option("mnist1d", "--dataset"),
    model: str = typer.Option("cnn1d", "--model"),
    regularizer: str = typer.Option("ce", "--regularizer"),
    param: list[str] = typer.Option([], "--param", help="Regularizer parameter k=v (repeatable)."),
    noise: str = typer.Option(
        "none", "--noise", help="KIND:RATE, e.g. symmetric:0.4 or adversarial-confident:0.2."
    ),
    # Training options left out take the spec's defaults (study.spec.TrainSpec), so a one-cell spec and
    # `study trial` with the same values build the same TrialConfig.
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Default: the spec default."),
    seed: int = typer.Option(0, "--seed"),
    noise_seed: int = typer.Option(0, "--noise-seed"),
    lr: float | None = typer.Option(None, "--lr", min=0.0, help="Default: the spec default."),
    weight_decay: float | None = typer.Option(
        None, "--weight-decay", min=0.0, help="Default: the spec default."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Default: the spec default."),
    optimizer: str | None = typer.Option(
        None, "--optimizer", help="adamw or sgd. Default: the spec default."
    ),
    root: str | None = typer.Option(None, "--root", help="Dataset root directory."),
    checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="Checkpoint/resume here."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda[:N] or mps. Default: auto."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Run one trial and print its metrics."""
    from study.cli.trial import run_trial_command

    run_trial_command(
        dataset=dataset,
        model=model,
        regularizer=regularizer,
        params=param,
        noise=noise,
        epochs=epochs,
        seed=seed,
        noise_seed=noise_seed,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        optimizer=optimizer,
        root=root,
        checkpoint_dir=checkpoint_dir,
        device=device,
        as_json=as_json,
        on_bad_input=_bad_input,
    )


@app.command()
def validate(
    spec: Path = typer.Argument(..., help="Study spec (YAML)."),
    address: str | None = typer.Option(
        None, "--address", help="The Ray cluster it will run on: skips the checks against this machine."
    ),
) -> None:
    """Validate a spec and print the plan (cells, trials, epoch budget)."""
    from study.spec import SpecError, check_data, check_local_resources, load_spec
    from study.sweep.plan import print_plan

    try:
        parsed = load_spec(spec)
        if address in (None, "local"):  # as `study run` without --address: this machine's resources
            check_local_resources(parsed, str(spec))
            check_data(parsed, str(spec))  # never downloads: `study run` does, before Ray starts
    except SpecError as exc:
        _bad_input(str(exc))
    print_plan(parsed, Console())


@app.command()
def report(
    out_dir: Path = typer.Argument(..., metavar="DIR", help="Results directory of a study."),
    fmt: str = typer.Option("rich", "--format", help="rich | markdown | latex"),
    plots: Path | None = typer.Option(
        None, "--plots", help="Also write the figures (PNG) to this directory (the run writes DIR/plots)."
    ),
    no_plots: bool = typer.Option(
        False, "--no-plots", hidden=True, help="Accepted; the report writes no plot."
    ),
    full: bool = typer.Option(False, "--full", help="Every table after the findings."),
    reference: str = typer.Option("ce", "--reference", help="Regularizer the others are compared with."),
    all_pairs: bool = typer.Option(False, "--all-pairs", help="Findings for every pair (Holm over pairs)."),
    compare: str | None = typer.Option(
        None, "--compare", metavar="A:B", help="A vs B at every setting (levels, difference, p, seed wins)."
    ),
) -> None:
    """Render the report of a results directory: findings first (--full: every table). Reads only: no
    file of the study changes (--plots writes figures where it is told)."""
    from reports.build import ResultsError, load_study

    if fmt not in ("rich", "markdown", "latex"):
        _bad_input(f"--format must be rich, markdown or latex, but got {fmt!r}")
    try:
        study = load_study(out_dir)
    except ResultsError as exc:
        _bad_input(str(exc))
    regs = sorted(study.trials["regularizer"].dropna().unique())
    named = [("--reference", reference)]
    pair = tuple(compare.split(":")) if compare is not None else None
    if pair is not None:
        if len(pair) != 2 or pair[0] == pair[1]:
            _bad_input(f"--compare must be A:B with two different regularizers, but got {compare!r}")
        named += [("--compare", r) for r in pair]
    # --compare also takes the name of regularizers run at matched strengths (contrasted at each value).
    bases = sorted({r.partition("@")[0] for r in regs if "@" in r} - set(regs))
    for option, name in named:
        allowed = regs + bases if option == "--compare" else regs
        if allowed and name not in allowed:
            _bad_input(
                f"{option} must name a regularizer of the study ({', '.join(allowed)}), but got {name!r}"
            )
    try:
        from reports.export import render_latex, render_markdown
        from reports.render import Options, render_rich

        options = Options(full=full, reference=reference, all_pairs=all_pairs, pair=pair)
        if fmt == "rich":
            render_rich(study, Console(), options)
        else:
            typer.echo((render_markdown if fmt == "markdown" else render_latex)(study, options))
        if plots is not None:
            from reports.plots import write_plots

            written = write_plots(study, plots, reference=reference)
            err.print(f"wrote {len(written)} plots to {plots}", style="dim", highlight=False)
    except ResultsError as exc:
        _bad_input(str(exc))
    except Exception as exc:  # runtime failure: one line, exit 1
        from rich.text import Text

        err.print(Text.assemble(("error:", "red"), f" {type(exc).__name__}: {exc}"), soft_wrap=True)
        raise typer.Exit(1) from None


@app.command()
def query(
    args: list[str] = typer.Argument(
        ...,
        metavar="DIR... SQL",
        help="One or more results directories, then the SQL over the views trials, epochs, evals, "
        "summary, projections, params (several directories: every view gains a `study` column).",
    ),
    csv: bool = typer.Option(False, "--csv", help="Print CSV."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON records."),
) -> None:
    """Run SQL (DuckDB) over the Parquet tables of one or several results directories."""
    from rich.markup import escape
    from rich.table import Table

    from reports.build import ResultsError
    from reports.query import run_query

    if csv and as_json:
        _bad_input("--csv and --json are exclusive")
    if len(args) < 2:
        _bad_input('study query needs a results directory and the SQL: study query DIR [DIR ...] "SQL"')
    *dirs, sql = args
    try:
        df = run_query(dirs[0] if len(dirs) == 1 else dirs, sql)
    except ResultsError as exc:
        _bad_input(str(exc))
    if csv:
        typer.echo(df.to_csv(index=False), nl=False)
    elif as_json:
        typer.echo(df.to_json(orient="records", double_precision=15, date_format="iso"))
    elif not Console().is_terminal:  # piped: every row and every digit (a float's shortest exact form)
        typer.echo(
            df.to_string(index=False, float_format=lambda v: repr(float(v))) if len(df.columns) else ""
        )
    else:
        limit = 200
        title = f"{len(df)} rows" + (f" (first {limit})" if len(df) > limit else "")
        table = Table(title=title)
        for col in map(str, df.columns):
            table.add_column(escape(col), overflow="fold")  # a narrow terminal wraps a value, never cuts it
        for row in df.head(limit).itertuples(index=False):  # values are data, not rich markup
            table.add_row(*(f"{v:.6g}" if isinstance(v, float) else escape(str(v)) for v in row))
        Console(emoji=False).print(table)


@app.command("ls")
def ls_(out_dir: Path = typer.Argument(Path("results"), metavar="DIR", help="Directory to search.")) -> None:
    """List the studies found under a directory (up to 2 levels deep) and their status."""
    import datetime

    from rich.markup import escape
    from rich.table import Table

    from reports.build import ResultsError
    from reports.query import list_studies

    try:
        studies = list_studies(out_dir)
    except ResultsError as exc:
        _bad_input(str(exc))
    if not studies:
        Console(emoji=False).print(
            f"no studies (directories with manifest.json) under {escape(str(out_dir))}", highlight=False
        )
        return
    table = Table("study", "status", "trials", "last ran")
    table.add_column("path", overflow="fold")
    for s in studies:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(s["trials"].items())) or "-"
        when = s["last_ran"] or s["last_modified"]
        when = datetime.datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M") if when else "-"
        table.add_row(*(escape(str(v)) for v in (s["study"], s["status"], counts, when, s["path"])))
    Console(emoji=False).print(table)


@app.command()
def dashboard(
    out_dir: Path = typer.Argument(..., metavar="DIR", help="Results directory of a study."),
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="Port on 127.0.0.1."),
) -> None:
    """Serve optuna-dashboard on 127.0.0.1 over the study's optuna.journal (extra: regstudy[dashboard])."""
    journal = out_dir / "optuna.journal"
    if not journal.is_file():
        _bad_input(f"{out_dir}: no optuna.journal (not a study results directory, or no search has run)")
    try:
        import optuna_dashboard
    except ImportError:
        _bad_input('study dashboard needs optuna-dashboard: pip install "regstudy[dashboard]"')
    import shutil
    import tempfile

    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from reports.query import driver_alive

    shown, what = journal, "search trials; final trials are added once the run has ended"
    finals = out_dir / "records" / "final"
    if driver_alive(out_dir) is not True and finals.is_dir() and any(finals.glob("*.json")):
        # The run has ended: a copy of the journal with each cell's final trials as "<cell>/final".
        from study.spec import load_spec
        from study.sweep.optuna_cells import add_final_studies

        shown = Path(tempfile.mkdtemp(prefix="regstudy-dashboard-")) / journal.name
        shutil.copy2(journal, shown)
        n = add_final_studies(
            JournalStorage(JournalFileBackend(str(shown))), load_spec(out_dir / "spec.yaml"), out_dir
        )
        what = f"search trials, and {n} final trials with their test metrics as <cell>/final studies"
    storage = JournalStorage(JournalFileBackend(str(shown)))
    err.print(f"optuna-dashboard on http://127.0.0.1:{port} ({what}; Ctrl-C stops it)", highlight=False)
    if shown != journal:
        _remove_on_sigterm(shown.parent)
    try:
        optuna_dashboard.run_server(storage, host="127.0.0.1", port=port)
    finally:
        if shown != journal:
            shutil.rmtree(shown.parent, ignore_errors=True)


def _remove_on_sigterm(path: Path) -> None:
    """Remove `path`, then die of SIGTERM as before. Not an exception: wsgiref's request handler (which
    optuna-dashboard serves with) swallows any exception raised while it answers a request."""
    import os
    import shutil

    def handler(signum: int, frame: object) -> None:
        shutil.rmtree(path, ignore_errors=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    app()
