"""What each association delivered, per study, for the audit trail: one
"object-received" record per study and association when it ends (PS3.15's
DICOM Instances Transferred), not one per object on the ingest path."""
from __future__ import annotations

import threading
from typing import Hashable

from archive import audit


class Received:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_assoc: dict[Hashable, dict] = {}

    def count(self, key: Hashable, who: tuple[str, str], result) -> None:  # noqa: ANN001
        """``who``: (calling AE title, "AE@address") as the audit record names the source."""
        if result.study_uid is None:
            return
        with self.lock:
            a = self.by_assoc.setdefault(key, {"who": who, "studies": {}})
            st = a["studies"].setdefault(result.study_uid, {"patient_id": result.patient_id,
                                                            "stored": 0, "refused": 0})
            st["stored" if result.acknowledged else "refused"] += 1
            if result.outcome.value in ("no_copy", "catalog_down"):
                # Refused for want of a verified copy or of the catalog: the watch alerts.
                st["no_copy"] = st.get("no_copy", 0) + 1

    def flush(self, key: Hashable, catalog) -> None:  # noqa: ANN001
        with self.lock:
            a = self.by_assoc.pop(key, None)
        if a is None:
            return
        for uid, st in a["studies"].items():
            audit.record_quietly(catalog, audit.Event(
                "object-received", "failure" if st["refused"] else "success", a["who"][0],
                a["who"][1], st["patient_id"], uid,
                {"stored": st["stored"], "refused": st["refused"],
                 **({"no_copy": st["no_copy"]} if st.get("no_copy") else {})}))
