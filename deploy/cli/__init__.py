"""The `pairloop` command: each sub-module registers its commands here, explicitly.

service.py   up, worker, model build-tiny          the processes of a deployment on one machine
hosts.py     gateway, vllm, adapter-sync, health   the parts on hosts of their own, and their health check
data.py      queue, db, export                     the feedback queue and the preference store
loop.py      train, cron, adapters                 the learning loop
simulate.py  simulate                              simulated users that prove the loop learns
"""

from __future__ import annotations

import os

import typer

from deploy import settings
from deploy.cli import data, hosts, loop, service, simulate
from serving.settings import still_an_example


def _check_environment() -> None:
    """Before any command: files it makes are its owner's only (the umask), the `PAIRLOOP_*` variables no part
    reads are named (a typo keeps a default in force), and one that still holds an example value of deploy/ stops
    the command."""
    os.umask(0o077)
    for line in settings.warnings():
        typer.echo(line, err=True)
    for name in settings.example_values():
        typer.echo(still_an_example(name), err=True)
        raise typer.Exit(1)


app = typer.Typer(
    help="pairloop: two answers per chat request, preferences in, better adapters out.",
    no_args_is_help=True,
    add_completion=False,
    callback=_check_environment,
)
for module in (service, hosts, data, loop, simulate):
    module.register(app)

__all__ = ["app"]
