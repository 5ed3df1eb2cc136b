"""How either edge (the operator's verbs, the daemon) starts: --config on every
command, the install's settings with its audit key, and known errors turned into
one line and an exit code."""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from archive import audit
from archive.config import config_path_from, load_settings
from archive.config.schema import Settings
from archive.errors import PacsvaultError


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
