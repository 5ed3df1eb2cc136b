"""Shared CLI plumbing: --config on every command, error-to-exit-code mapping."""
from __future__ import annotations

import functools
import json
import sys
from typing import TYPE_CHECKING, Any, Callable

import click

from archive import audit
from archive.config import config_path_from, load_settings
from archive.config.schema import Settings
from archive.errors import PacsvaultError

if TYPE_CHECKING:
    from archive import auth


def config_option(f: Callable) -> Callable:
    """Accept --config on the subcommand too (`pacsvault status --config X`)."""
    return click.option("--config", "config", metavar="FILE", default=None,
                        help="Config file (default $PACSVAULT_CONFIG or ./pacsvault.toml).")(f)


def settings_from(ctx: click.Context, config: str | None) -> Settings:
    """The install's settings; audit records this process writes are signed with its key."""
    chosen = config or (ctx.find_root().obj or {}).get("config")
    settings = load_settings(config_path_from(chosen))
    audit.configure(settings.data_dir)
    return settings


def handle_errors(f: Callable) -> Callable:
    """Known errors become one line on stderr and their exit code; no traceback."""
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except PacsvaultError as e:
            click.echo(f"pacsvault: {e}", err=True)
            sys.exit(e.exit_code)
    return wrapper


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def authorize(settings: Settings, permission: str, verb: str, *,
              allow_must_change: bool = False) -> "auth.Actor":
    """The operator running this verb, allowed to (archive/auth.py); named in the
    audit trail from here on. Also notes a changed config in the audit trail."""
    from archive import atna, audit, auth
    from archive.bootstrap import open_catalog

    audit.configure(settings.data_dir)
    atna.install(settings)
    catalog = open_catalog(settings)
    try:
        actor = auth.authenticate(catalog, settings.accounts, settings.config_path,
                                  allow_must_change=allow_must_change)
        auth.current_actor.set(actor.name)
        note_config(catalog, settings, actor.name)
        try:
            auth.require(actor, permission, verb)
        except auth.AuthError:
            # A refused verb is a security event (PS3.15: Security Alert).
            audit.record_quietly(catalog, audit.Event(
                "user-change", "failure", actor.name, audit.host(),
                detail={"refused": verb, "role": actor.role, "permission": permission}))
            raise
    finally:
        catalog.close()
    return actor


def note_config(catalog, settings: Settings, actor: str) -> None:  # noqa: ANN001
    """An audit record whenever the config file differs from the last one seen."""
    import hashlib

    from sqlalchemy import select

    from archive import audit
    from archive.catalog.models import AuditRecord

    if settings.config_path is None or not settings.config_path.exists():
        return
    digest = hashlib.sha256(settings.config_path.read_bytes()).hexdigest()
    with catalog.unit() as uow:
        last = uow.session.scalar(select(AuditRecord.detail).where(
            AuditRecord.action == "config-change").order_by(AuditRecord.id.desc()).limit(1))
    if last is None or json.loads(last).get("sha256") != digest:
        audit.record_quietly(catalog, audit.Event("config-change", actor=actor, source=audit.host(),
                                                  detail={"sha256": digest,
                                                          "path": str(settings.config_path),
                                                          "first_seen": last is None}))


def actor_name() -> str:
    from archive.auth import current_actor

    return current_actor.get() or "system"
