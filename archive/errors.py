"""Error classes shared by every package.

The class docstring is the message template and ``exit_code`` is what the CLI
exits with. Message arguments are ids, hashes and site names, never patient
data. Each edge maps these to its own vocabulary (DICOM status, exit code).

    PacsvaultError
      ConfigError                 bad or missing configuration
      InvalidInput                untrusted input refused (UID, AE title, dataset)
      CatalogError                catalog unreachable or inconsistent
      BackendError                storage backend failures (tiers/backend.py)
        Unavailable  (retryable)  site down, unmounted, I/O error
        StorageFull               no space left
        ObjectNotFound
        CopyCorrupt  (integrity)  read-back does not match the expected SHA-256
      NoHealthySite               nothing could take a copy: never acknowledge
"""
from __future__ import annotations


class PacsvaultError(Exception):
    """{}"""

    exit_code = 2

    def __str__(self) -> str:
        doc = type(self).__doc__ or "{}"
        template = doc.strip().splitlines()[0]
        try:
            return template.format(*self.args)
        except (IndexError, KeyError):
            return " ".join(str(a) for a in self.args) or template


class ConfigError(PacsvaultError):
    """configuration error: {}"""

    exit_code = 3


class InvalidInput(PacsvaultError):
    """invalid input: {}"""

    exit_code = 4


class CatalogError(PacsvaultError):
    """catalog error: {}"""

    exit_code = 5


class NoHealthySite(PacsvaultError):
    """no online site could take a verified copy: {}"""

    exit_code = 20


def describe_failure(e: BaseException) -> str:
    """One line naming why a study failed, fit for a report or a log. Our own
    errors carry messages written for operators (UIDs, never patient data);
    anything else is named by its type only: its text may quote catalog rows."""
    if isinstance(e, PacsvaultError):
        return str(e)
    return f"unexpected {type(e).__name__}"
