"""`pacsvault user ...`, `login`, `logout`: operator accounts (archive/auth.py)."""
from __future__ import annotations

import os
import sys

import click

from archive import audit, auth
from archive.app.compose import open_catalog
from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)


def new_password(prompt: str = "New password") -> str:
    """From PACSVAULT_NEW_PASSWORD, or asked twice on a terminal; never an argument
    (it would show in `ps` and the shell history)."""
    pw = os.environ.get("PACSVAULT_NEW_PASSWORD")
    if pw is not None:
        return pw
    if not sys.stdin.isatty():
        raise auth.AuthError("give the new password in PACSVAULT_NEW_PASSWORD (or run this "
                             "on a terminal to be asked)")
    return click.prompt(prompt, hide_input=True, confirmation_prompt=True, err=True)


@click.group()
def user() -> None:
    """Operator accounts: add, passwd, disable, enable, role, list, roles."""


@user.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(list(auth.ROLES)),
              help="viewer, operator, key-custodian, auditor or admin.")
@config_option
@click.pass_context
@handle_errors
def user_add(ctx: click.Context, name: str, role: str, config: str | None) -> None:
    """Create an account. The password (PACSVAULT_NEW_PASSWORD, or asked twice) must
    be changed by its owner at first log-in."""
    settings = settings_from(ctx, config)
    actor = authorize(settings, "admin", "user add")
    pw = new_password()
    catalog = open_catalog(settings)
    try:
        auth.create_user(catalog, name, role, pw, settings.accounts, must_change=True)
        audit.record(catalog, audit.Event("user-change", actor=actor.name, source=audit.host(),
                                          detail={"added": name, "role": role}))
    finally:
        catalog.close()
    click.echo(f"user {name} ({role}) added; the password must be changed at first log-in")


@user.command("passwd")
@click.argument("name", required=False)
@config_option
@click.pass_context
@handle_errors
def user_passwd(ctx: click.Context, name: str | None, config: str | None) -> None:
    """Change your password, or (admin) reset NAME's: a reset must be changed at
    its owner's next log-in. The new one comes from PACSVAULT_NEW_PASSWORD or is
    asked twice."""
    settings = settings_from(ctx, config)
    catalog = open_catalog(settings)
    try:
        actor = auth.authenticate(catalog, settings.accounts, settings.config_path,
                                  allow_must_change=True)
        target = name or actor.name
        if not actor.accounts:
            raise auth.AuthError("this install has no accounts (make one with init --admin)")
        if target != actor.name:
            auth.require(actor, "admin", "user passwd for someone else")
        auth.set_password(catalog, target, new_password(), settings.accounts,
                          by_admin=target != actor.name)
        audit.record(catalog, audit.Event("user-change", actor=actor.name, source=audit.host(),
                                          detail={"password_set": target,
                                                  "reset": target != actor.name}))
    finally:
        catalog.close()
    click.echo(f"password of {target} changed" + ("; it must be changed at the next log-in"
                                                   if target != actor.name else ""))


def _set(ctx: click.Context, config: str | None, name: str, verb: str, **values: object) -> None:
    from sqlalchemy import delete, select, update

    from archive.catalog.models import LoginSession, User

    settings = settings_from(ctx, config)
    actor = authorize(settings, "admin", f"user {verb}")
    if name == actor.name and (values.get("disabled") or values.get("role", "admin") != "admin"):
        raise auth.AuthError("an administrator cannot disable or demote themselves")
    catalog = open_catalog(settings)
    try:
        with catalog.unit(write=True) as uow:
            uid = uow.session.scalar(select(User.id).where(User.name == name))
            if uid is None:
                raise auth.AuthError(f"no user {name}")
            uow.session.execute(update(User).where(User.id == uid).values(**values))
            if values.get("disabled"):
                uow.session.execute(delete(LoginSession).where(LoginSession.user_fk == uid))
            uow.commit()
        audit.record(catalog, audit.Event("user-change", actor=actor.name, source=audit.host(),
                                          detail={verb: name, **{k: str(v) for k, v in values.items()}}))
    finally:
        catalog.close()
    click.echo(f"user {name}: {verb}")


@user.command("disable")
@click.argument("name")
@config_option
@click.pass_context
@handle_errors
def user_disable(ctx: click.Context, name: str, config: str | None) -> None:
    """Disable an account (its sessions end)."""
    _set(ctx, config, name, "disable", disabled=True)


@user.command("enable")
@click.argument("name")
@config_option
@click.pass_context
@handle_errors
def user_enable(ctx: click.Context, name: str, config: str | None) -> None:
    """Enable an account again (and clear a lockout)."""
    _set(ctx, config, name, "enable", disabled=False, failed_logins=0, locked_until=None)


@user.command("role")
@click.argument("name")
@click.argument("role", type=click.Choice(list(auth.ROLES)))
@config_option
@click.pass_context
@handle_errors
def user_role(ctx: click.Context, name: str, role: str, config: str | None) -> None:
    """Give NAME another role."""
    _set(ctx, config, name, "role", role=role)


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
@click.pass_context
@handle_errors
def user_list(ctx: click.Context, as_json: bool, config: str | None) -> None:
    """Accounts: role, state, last log-in, lockout."""
    from sqlalchemy import select

    from archive.catalog.models import User
    from archive.clock import iso

    settings = settings_from(ctx, config)
    authorize(settings, "admin", "user list")
    catalog = open_catalog(settings)
    try:
        with catalog.unit() as uow:
            rows = [{"name": u.name, "role": u.role, "disabled": u.disabled,
                     "must_change": u.must_change, "locked_until": iso(u.locked_until),
                     "last_login_at": iso(u.last_login_at),
                     "password_set_at": iso(u.password_set_at)}
                    for u in uow.session.scalars(select(User).order_by(User.name))]
    finally:
        catalog.close()
    if as_json:
        emit_json({"users": rows})
        return
    for r in rows:
        state = "disabled" if r["disabled"] else "locked" if r["locked_until"] else "active"
        click.echo(f"{r['name']:20} {r['role']:14} {state:9} last log-in {r['last_login_at'] or '-'}"
                   + ("  (must change password)" if r["must_change"] else ""))


@user.command("roles")
def user_roles() -> None:
    """The roles and what each may do."""
    for role, perms in auth.ROLES.items():
        click.echo(f"{role:14} " + "; ".join(f"{p}: {auth.PERMISSIONS[p]}" for p in sorted(perms)))


@click.command()
@click.option("--user", "name", default=None, help="Account name (default: asked).")
@config_option
@click.pass_context
@handle_errors
def login(ctx: click.Context, name: str | None, config: str | None) -> None:
    """Log in for this terminal's later commands (a session with an expiry)."""
    settings = settings_from(ctx, config)
    name = name or os.environ.get("PACSVAULT_USER") or click.prompt("User", err=True)
    pw = os.environ.get("PACSVAULT_PASSWORD")
    if pw is None:
        pw = click.prompt("Password", hide_input=True, err=True)
    catalog = open_catalog(settings)
    try:
        path = auth.login(catalog, name, pw, settings.accounts, settings.config_path)
    finally:
        catalog.close()
    click.echo(f"logged in as {name} for {settings.accounts.session_hours:g} h (session in {path})")


@click.command()
@config_option
@click.pass_context
@handle_errors
def logout(ctx: click.Context, config: str | None) -> None:
    """End this terminal's session."""
    settings = settings_from(ctx, config)
    path = auth.session_file(settings.config_path)
    if path.exists():
        import hashlib

        from sqlalchemy import delete

        from archive.catalog.models import LoginSession

        lines = path.read_text().split()
        catalog = open_catalog(settings)
        try:
            if len(lines) >= 2:
                with catalog.unit(write=True) as uow:
                    uow.session.execute(delete(LoginSession).where(
                        LoginSession.token_sha256 == hashlib.sha256(lines[1].encode()).hexdigest()))
                    uow.commit()
                audit.record_quietly(catalog, audit.Event("logout", actor=lines[0],
                                                          source=audit.host()))
        finally:
            catalog.close()
        path.unlink()
    click.echo("logged out")
