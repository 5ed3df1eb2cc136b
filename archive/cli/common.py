"""Shared CLI plumbing: who runs the verb and may they (the rest is archive/invocation.py)."""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from archive import atna, audit, auth
from archive.app.compose import open_catalog
from archive.auth import current_actor
from archive.catalog.models import AuditRecord
from archive.config.schema import Settings
from archive.invocation import config_option, emit_json, handle_errors, settings_from  # noqa: F401 - re-exported to the verbs

if TYPE_CHECKING:
    from archive import auth


def authorize(settings: Settings, permission: str, verb: str, *,
              allow_must_change: bool = False) -> "auth.Actor":
    """The operator running this verb, allowed to (archive/auth.py); named in the
    audit trail from here on. Also notes a changed config in the audit trail."""

    audit.configure(settings.data_dir)
    atna.install(settings)
    catalog = open_catalog(settings)
    try:
        phrase = os.environ.get("PACSVAULT_EMERGENCY")
        if phrase:                  # break glass: the sealed emergency admin, in its window
            actor = _emergency_actor(catalog, settings, phrase)
        else:
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


def _emergency_actor(catalog, settings: Settings, phrase: str) -> "auth.Actor":  # noqa: ANN001
    from archive import break_glass
    try:
        if not break_glass.active(settings.data_dir, phrase):
            raise break_glass.BreakGlassError("the emergency window is not open (or has "
                                              "ended): 'pacsvault emergency open --reason ...'")
    except break_glass.BreakGlassError:
        audit.record_quietly(catalog, audit.Event("login-failed", "failure", break_glass.ACTOR,
                                                  audit.host(), detail={"break_glass": True}))
        raise
    return auth.Actor(break_glass.ACTOR, "admin", accounts=True)


def note_config(catalog, settings: Settings, actor: str) -> None:  # noqa: ANN001
    """An audit record whenever the config file differs from the last one seen."""
    import hashlib

    from sqlalchemy import select


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

    return current_actor.get() or "system"
