"""Entry point: `pacsvault [--config FILE] VERB ...`."""
from __future__ import annotations

import os

import click

from archive.cli import (audit, dr, drill, jobs, peers, replicate, restore, scrub, serve, setup,
                         status, tiering, users)


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
cli.add_command(serve.serve)
cli.add_command(status.status)
cli.add_command(tiering.migrate)
cli.add_command(tiering.recall)
cli.add_command(scrub.scrub)
cli.add_command(jobs.jobs)
cli.add_command(replicate.replicate)
cli.add_command(dr.dr)
cli.add_command(restore.restore)
cli.add_command(drill.drill)
cli.add_command(users.user)
cli.add_command(users.login)
cli.add_command(users.logout)
cli.add_command(audit.audit)


# Patient data and secrets are never for other users, whatever umask the caller has
# (cron, a shell with 022 or 000): group may read, others get nothing. The daemon's
# workers, and every file any verb creates, inherit it. Code that creates sensitive
# files also passes explicit modes (the catalog, sites, keys).
PRIVATE_UMASK = 0o027


def main() -> None:
    os.umask(os.umask(PRIVATE_UMASK) | PRIVATE_UMASK)
    cli(prog_name="pacsvault")


if __name__ == "__main__":
    main()
