"""`pacsvault serve`: run the daemon in the foreground."""
from __future__ import annotations

import os
import sys

import click

from archive.cli.common import config_option, handle_errors, settings_from


@click.command()
@click.option("--dicom-port", type=click.IntRange(1, 65535), default=None,
              help="DICOM port (default: dicom.port from the config, 11112).")
@click.option("--http-port", type=click.IntRange(0, 65535), default=None,
              help="HTTP status/metrics port on http.bind (0 = off; default http.port).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="DICOM worker processes sharing the port (default dicom.workers or one per core).")
@config_option
@click.pass_context
@handle_errors
def serve(ctx: click.Context, dicom_port: int | None, http_port: int | None,
          workers: int | None, config: str | None) -> None:
    """Run the DICOM listener (C-ECHO, C-STORE), repair loop and HTTP status.

    SIGTERM finishes in-flight work and exits 0.
    """
    from archive.serve import Supervisor, setup_logging

    settings = settings_from(ctx, config)
    setup_logging(os.environ.get("PACSVAULT_LOG_LEVEL", "INFO"))
    n = workers or settings.dicom.workers or (os.cpu_count() or 1)
    sup = Supervisor(settings, dicom_port or settings.dicom.port,
                     settings.http.port if http_port is None else http_port, n)
    sys.exit(sup.run())
