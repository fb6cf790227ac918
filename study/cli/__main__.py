"""`python -m study.cli ...`: the same app as the `study` console script."""

from study.cli import app

app()
