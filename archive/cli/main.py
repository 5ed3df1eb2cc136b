"""The command group: `pacsvault [--config FILE] VERB ...` (every verb but `serve`,
which is the daemon edge's own; archive/main.py puts the two together)."""
from __future__ import annotations

import click

from archive.cli import (
    audit,
    catalog,
    dr,
    drill,
    emergency,
    find,
    jobs,
    peers,
    replicate,
    restore,
    scrub,
    setup,
    status,
    tiering,
    users,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", metavar="FILE", default=None,
              help="Config file (default $PACSVAULT_CONFIG or ./pacsvault.toml).")
@click.version_option(package_name="pacsvault")
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """pacsvault: mirrored DICOM archive with object tiering and disaster recovery.

    A PACS pushes studies with C-STORE; every object is written to two online
    sites, verified by SHA-256 and cataloged before it is acknowledged.
    """
    ctx.obj = {"config": config}


cli.add_command(setup.init)
cli.add_command(peers.peer)
cli.add_command(status.status)
cli.add_command(tiering.migrate)
cli.add_command(tiering.recall)
cli.add_command(scrub.scrub)
cli.add_command(jobs.jobs)
cli.add_command(replicate.replicate)
cli.add_command(dr.dr)
cli.add_command(restore.restore)
cli.add_command(find.find)
cli.add_command(drill.drill)
cli.add_command(users.user)
cli.add_command(users.login)
cli.add_command(users.logout)
cli.add_command(audit.audit)
cli.add_command(catalog.catalog)
cli.add_command(emergency.emergency)

