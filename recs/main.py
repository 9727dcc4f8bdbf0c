"""`recs`: one command line for every Lambdarec job.

Each layer registers its own commands (see `register` in each `cli.py`), so this file only
wires them together. Heavy imports (Spark, Airflow, LightGBM) happen inside commands, which
keeps `recs --help` instant.
"""

from __future__ import annotations

import typer

from bench import cli as bench_cli
from evaluation import cli as evaluate_cli
from recs import data_cli, nightly, system_cli
from serving import cli as serving_cli
from spark_jobs import cli as batch_cli
from speed_layer import cli as speed_cli
from warehouse import cli as warehouse_cli

app = typer.Typer(
    name="recs",
    help="Lambdarec: real-time product recommendations (batch + speed + serving layers).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

for module in (system_cli, data_cli, batch_cli, nightly, speed_cli, serving_cli, warehouse_cli, evaluate_cli, bench_cli):
    module.register(app)


if __name__ == "__main__":
    app()
