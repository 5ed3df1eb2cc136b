"""`pacsvault serve`: run the daemon in the foreground."""
from __future__ import annotations

import os
import sys

import click

from archive.config.schema import DicomSettings, Settings
from archive.errors import ConfigError
from archive.invocation import config_option, handle_errors, settings_from


@click.command()
@click.option("--dicom-port", type=click.IntRange(1, 65535), default=None,
              help="DICOM port (default: dicom.port from the config, 11112).")
@click.option("--http-port", type=click.IntRange(0, 65535), default=None,
              help="HTTP status/metrics port on http.bind (0 = off; default http.port).")
@click.option("--dicom-tls-port", type=click.IntRange(1, 65535), default=None,
              help="DICOM TLS port (default dicom.tls_port; needs dicom.tls_cert/tls_key).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="DICOM worker processes sharing the port (default dicom.workers or one per core).")
@config_option
@click.pass_context
@handle_errors
def serve(ctx: click.Context, dicom_port: int | None, http_port: int | None,
          dicom_tls_port: int | None, workers: int | None, config: str | None) -> None:
    """Run the DICOM listener (C-ECHO, C-STORE), repair loop and HTTP status.

    SIGTERM finishes in-flight work and exits 0.
    """

    # Loaded here, not at the top: every `pacsvault` call imports this module, and only
    # `serve` needs the daemon (APScheduler, the listeners). import-linter counts it all
    # the same, so this hides no cycle.
    from archive.daemon.serve import Supervisor, setup_logging

    settings = settings_from(ctx, config)
    dicom_port = dicom_port or settings.dicom.port
    if dicom_tls_port is not None:
        settings = _with_tls_port(settings, dicom_port, dicom_tls_port)
    setup_logging(os.environ.get("PACSVAULT_LOG_LEVEL", "INFO"))
    n = workers or settings.dicom.workers or (os.cpu_count() or 1)
    sup = Supervisor(settings, dicom_port,
                     settings.http.port if http_port is None else http_port, n)
    sys.exit(sup.run())


def _with_tls_port(settings: Settings, port: int, tls_port: int) -> Settings:
    """The config with the DICOM ports replaced, validated again (cert and key needed)."""
    from pydantic import ValidationError

    try:
        dicom = DicomSettings.model_validate({**settings.dicom.model_dump(), "port": port,
                                              "tls_port": tls_port})
    except ValidationError as e:
        raise ConfigError("--dicom-tls-port: " + "; ".join(err["msg"] for err in e.errors())) from None
    return settings.model_copy(update={"dicom": dicom})
