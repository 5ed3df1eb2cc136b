"""`pacsvault init [DIR]`: write a default config and create what it names."""
from __future__ import annotations

import time
from pathlib import Path

import click

from archive import spool
from archive.app.compose import open_catalog, open_object_tier, open_sites
from archive.cli.common import handle_errors
from archive.config.load import DEFAULT_NAME, default_config_text, load_settings
from archive.errors import ConfigError


def _backfill_progress():  # noqa: ANN202
    """A line on stderr every 10 s while an upgrade reads stored objects (an archive
    of millions takes hours), saying that an interruption loses nothing."""
    last = [time.monotonic()]

    def show(report) -> None:  # noqa: ANN001
        if time.monotonic() - last[0] >= 10:
            last[0] = time.monotonic()
            click.echo(f"query attributes: {report.instances} instances read so far "
                       "(interrupt at any time: 'pacsvault init' again resumes)", err=True)
    return show


@click.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--config", "config", metavar="FILE", default=None,
              help="Initialize what an existing config names instead of writing a new one.")
@click.option("--admin", "admin", metavar="NAME", default=None,
              help="Create the first administrator account (password from PACSVAULT_PASSWORD, "
                   "or asked twice); from then on every data verb needs an operator.")
@handle_errors
def init(directory: Path, config: str | None, admin: str | None) -> None:
    """Write DIR/pacsvault.toml (DIR defaults to .) and create sites and catalog.

    The embedded default keeps everything under DIR: two site directories, the
    object tier directory, the SQLite catalog and the spool. Running init again on an existing install
    creates anything missing and migrates the catalog schema; it never
    overwrites a config or a site.
    """
    if config:
        path = Path(config)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / DEFAULT_NAME
        if not path.exists():
            path.write_text(default_config_text())
            click.echo(f"wrote {path}")
        else:
            click.echo(f"{path} exists; keeping it")
    settings = load_settings(path)
    for site in open_sites(settings):
        try:
            site.initialize()
        except Exception as e:
            raise ConfigError(f"sites.{site.name}: cannot initialize {site.root}: {e}") from None
        click.echo(f"site {site.name}: {site.root}")
    tier = open_object_tier(settings)
    try:
        tier.initialize()
    except Exception as e:
        raise ConfigError(f"objects: cannot initialize the object tier {tier.name}: {e}") from None
    click.echo(f"object tier {tier.name}: {settings.objects.kind} "
               f"{settings.objects.path if settings.objects.kind == 'directory' else ''}".rstrip())
    spool.ensure(settings.ingest.spool_dir)
    catalog = open_catalog(settings, migrate=True)
    try:
        # Objects stored before the query columns existed: read them once (resumable).
        from archive.app.query_backfill import backfill_from_sites  # pydicom: only init needs it
        filled = backfill_from_sites(settings, catalog, progress=_backfill_progress())
        if filled.instances or filled.series or filled.studies or filled.unreadable:
            click.echo(f"query attributes filled: {filled}")
        from archive import audit
        audit.configure(settings.data_dir)
        if admin is not None:
            _first_admin(catalog, settings, admin)
    finally:
        catalog.close()
    click.echo(f"catalog ready ({settings.catalog.url.split('://', 1)[0]})")
    c = f"pacsvault --config {path}"
    click.echo(f"next: {c} peer add AE_TITLE HOST   then   {c} serve")


def _first_admin(catalog, settings, name: str) -> None:  # noqa: ANN001
    """The first account: an admin whose password (from init) need not be changed."""
    import os
    import sys

    from archive import audit, auth

    if auth.has_accounts(catalog):
        raise auth.AuthError("this install already has accounts: add more with 'pacsvault user add'")
    pw = os.environ.get("PACSVAULT_PASSWORD")
    if pw is None:
        if not sys.stdin.isatty():
            raise auth.AuthError("--admin: give the password in PACSVAULT_PASSWORD")
        pw = click.prompt(f"Password for {name}", hide_input=True, confirmation_prompt=True, err=True)
    auth.create_user(catalog, name, "admin", pw, settings.accounts, must_change=False)
    audit.record(catalog, audit.Event("user-change", actor=name, source=audit.host(),
                                      detail={"added": name, "role": "admin", "first": True}))
    click.echo(f"administrator {name} created: every data verb now needs PACSVAULT_USER and "
               "PACSVAULT_PASSWORD, or 'pacsvault login'")
