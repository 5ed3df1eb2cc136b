"""`pacsvault peer add|list|remove`: the DICOM allow-list."""
from __future__ import annotations

import click

from archive import audit
from archive.app.compose import open_catalog
from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)
from archive.clock import utcnow
from archive.peers import add_peer, list_peers, remove_peer


@click.group()
def peer() -> None:
    """Manage the DICOM peers allowed to associate (AE title + address)."""


@peer.command("add")
@click.argument("ae_title")
@click.argument("host")
@click.option("--port", type=int, default=None, help="The peer's own DICOM port (for sending back).")
@config_option
@click.pass_context
@handle_errors
def peer_add(ctx: click.Context, ae_title: str, host: str, port: int | None, config: str | None) -> None:
    """Allow AE_TITLE to associate from HOST (an IP address or a host name)."""
    settings = settings_from(ctx, config)
    actor = authorize(settings, "admin", "peer add")
    catalog = open_catalog(settings)
    try:
        add_peer(catalog, ae_title, host, port, utcnow())
        audit.record(catalog, audit.Event("peer-change", actor=actor.name, source=audit.host(),
                                          detail={"added": ae_title.strip(), "host": host,
                                                  "port": port}))
    finally:
        catalog.close()
    click.echo(f"peer {ae_title.strip()} at {host} allowed")


@peer.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
@click.pass_context
@handle_errors
def peer_list(ctx: click.Context, as_json: bool, config: str | None) -> None:
    """List allowed peers."""
    settings = settings_from(ctx, config)
    authorize(settings, "read", "peer list")
    catalog = open_catalog(settings)
    try:
        rows = list_peers(catalog)
    finally:
        catalog.close()
    if as_json:
        emit_json({"peers": [{"ae_title": p.ae_title, "host": p.host, "port": p.port} for p in rows]})
        return
    for p in rows:
        click.echo(f"{p.ae_title:<16} {p.host}{'' if p.port is None else f':{p.port}'}")


@peer.command("remove")
@click.argument("ae_title")
@click.argument("host", required=False)
@config_option
@click.pass_context
@handle_errors
def peer_remove(ctx: click.Context, ae_title: str, host: str | None, config: str | None) -> None:
    """Remove AE_TITLE (from HOST only, if given). Exit 1 if nothing matched."""
    settings = settings_from(ctx, config)
    actor = authorize(settings, "admin", "peer remove")
    catalog = open_catalog(settings)
    try:
        n = remove_peer(catalog, ae_title, host)
        audit.record(catalog, audit.Event("peer-change", actor=actor.name, source=audit.host(),
                                          detail={"removed": ae_title, "host": host, "entries": n}))
    finally:
        catalog.close()
    click.echo(f"removed {n} peer entr{'y' if n == 1 else 'ies'}")
    if n == 0:
        raise SystemExit(1)
