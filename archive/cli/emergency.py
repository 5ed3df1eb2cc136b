"""`pacsvault emergency seal|open|close|status`: break-glass access (archive/break_glass.py)."""
from __future__ import annotations

import os
import sys

import click

from archive.cli.common import (
    authorize,
    config_option,
    emit_json,
    handle_errors,
    settings_from,
)


@click.group()
def emergency() -> None:
    """Emergency access when every admin is locked out or unavailable (break glass)."""


@emergency.command("seal")
@config_option
@click.pass_context
@handle_errors
def seal_cmd(ctx: click.Context, config: str | None) -> None:
    """Make a new emergency passphrase (admin). It is printed once: put it in a sealed
    envelope in the safe. Any earlier seal is void."""
    from archive import audit, break_glass
    from archive.app.compose import open_catalog

    settings = settings_from(ctx, config)
    actor = authorize(settings, "admin", "emergency seal")
    phrase = break_glass.seal(settings.data_dir, actor.name)
    cat = open_catalog(settings)
    try:
        audit.record_quietly(cat, audit.Event("user-change", "success", actor.name, audit.host(),
                                              detail={"break_glass": "sealed"}))
    finally:
        cat.close()
    click.echo(phrase)
    click.echo("the emergency passphrase above is shown once: seal it in an envelope; opening "
               "it alerts, is audited and lasts at most four hours", err=True)


@emergency.command("open")
@click.option("--reason", required=True, help="Why (audited, sent with the alert, reviewed).")
@click.option("--minutes", type=int, default=60, show_default=True,
              help="How long the window lasts (at most 240).")
@click.option("--json", "as_json", is_flag=True)
@config_option
@click.pass_context
@handle_errors
def open_cmd(ctx: click.Context, reason: str, minutes: int, as_json: bool,
             config: str | None) -> None:
    """Break the seal: with the passphrase in PACSVAULT_EMERGENCY (or typed), commands
    run as the admin 'break-glass' until the window ends. Raises a critical alert; every
    action is audited under that name ('pacsvault audit --user break-glass')."""
    from archive import audit, break_glass
    from archive.alerts import Alert, send_alert
    from archive.app.compose import open_catalog

    settings = settings_from(ctx, config)
    audit.configure(settings.data_dir)
    phrase = os.environ.get("PACSVAULT_EMERGENCY") or click.prompt(
        "emergency passphrase", hide_input=True, err=True)
    cat = open_catalog(settings)
    try:
        try:
            until = break_glass.open_window(settings.data_dir, phrase, reason, minutes)
        except break_glass.BreakGlassError as e:
            audit.record_quietly(cat, audit.Event("login-failed", "failure", break_glass.ACTOR,
                                                  audit.host(),
                                                  detail={"break_glass": True, "why": str(e)}))
            raise
        audit.record_quietly(cat, audit.Event(
            "login", "success", break_glass.ACTOR, audit.host(),
            detail={"break_glass": True, "reason": " ".join(reason.split())[:500],
                    "until": until.isoformat()}))
    finally:
        cat.close()
    problems = send_alert(settings.alerts, Alert(
        "security", "critical", f"EMERGENCY ACCESS opened on {audit.host()} until "
        f"{until.isoformat(timespec='minutes')}: every action is audited as 'break-glass' "
        "and must be reviewed", details="pacsvault audit --user break-glass"))
    out = {"ok": True, "actor": break_glass.ACTOR, "until": until.isoformat(),
           "alert_problems": problems}
    if as_json:
        emit_json(out)
    else:
        click.echo(f"emergency access open until {until.isoformat(timespec='minutes')}: run "
                   "commands with PACSVAULT_EMERGENCY set; they act as 'break-glass' (admin) "
                   "and are audited. Close it with 'pacsvault emergency close'.")
    if problems:
        click.echo("ALERT not delivered: " + "; ".join(problems), err=True)


@emergency.command("close")
@config_option
@click.pass_context
@handle_errors
def close_cmd(ctx: click.Context, config: str | None) -> None:
    """End the window now (the emergency actor or an admin). The seal stays broken."""
    from archive import audit, break_glass
    from archive.app.compose import open_catalog

    settings = settings_from(ctx, config)
    actor = authorize(settings, "admin", "emergency close")
    closed = break_glass.close_window(settings.data_dir)
    cat = open_catalog(settings)
    try:
        audit.record_quietly(cat, audit.Event("logout", "success", actor.name, audit.host(),
                                              detail={"break_glass": "closed"}))
    finally:
        cat.close()
    click.echo("emergency window closed; an admin makes a new seal" if closed
               else "no emergency window was open")


@emergency.command("status")
@click.option("--json", "as_json", is_flag=True)
@config_option
@click.pass_context
@handle_errors
def status_cmd(ctx: click.Context, as_json: bool, config: str | None) -> None:
    """Sealed, open (until when, why) or broken (used: make a new seal)."""
    from archive import break_glass

    settings = settings_from(ctx, config)
    authorize(settings, "read", "emergency status")
    st = break_glass.state(settings.data_dir)
    if as_json:
        emit_json(st)
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in st.items() if v))
    if st["state"] in ("none", "broken"):
        sys.exit(1)
