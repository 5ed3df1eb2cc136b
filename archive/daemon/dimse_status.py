"""Map ingest outcomes to C-STORE status codes (PS3.4 B.2.3, PS3.7 C)."""
from __future__ import annotations

from archive.app.ingest import Outcome

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700        # Refused: Out of Resources
DATASET_MISMATCH = 0xA900        # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000       # Error: Cannot understand
PROCESSING_FAILURE = 0x0110      # Processing failure (catalog unavailable)

_BY_OUTCOME = {
    Outcome.STORED: SUCCESS,
    Outcome.DUPLICATE: SUCCESS,
    Outcome.INVALID: CANNOT_UNDERSTAND,
    Outcome.MISMATCH: DATASET_MISMATCH,
    Outcome.NO_COPY: OUT_OF_RESOURCES,
    Outcome.CATALOG_DOWN: OUT_OF_RESOURCES,
}


def store_status(outcome: Outcome) -> int:
    return _BY_OUTCOME[outcome]
