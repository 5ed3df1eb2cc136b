"""Audit records of use-case runs, built the same way whether an operator ran the
verb or the daemon's scheduler did (counts and study UIDs; the audit trail is the
one place patient identifiers belong)."""
from __future__ import annotations

from archive import audit


def audit_migration(catalog, actor: str, report) -> None:  # noqa: ANN001
    """One audit record per study the run touched."""
    audit.record_studies(catalog, "migration", actor, {
        s.study_uid: {"outcome": s.outcome, "instances": s.instances, "bundled": s.bundled,
                      "purged": s.purged} for s in report.studies if s.outcome != "skipped"},
        outcome_of=lambda d: "failure" if d["outcome"] == "failed" else "success")


def audit_findings(catalog, actor: str, j: dict) -> None:  # noqa: ANN001
    """Damage found by a scrub touches the protection of a patient's data: one audit
    record per damaged study (orphans, which belong to no study, as one count)."""
    per: dict[str, dict] = {}
    for f in j["findings"]:
        if f["study_uid"]:
            d = per.setdefault(f["study_uid"], {"run_id": j["run_id"], "findings": []})
            d["findings"].append({"kind": f["kind"], "sop_uid": f["sop_uid"], "site": f["site"],
                                  "repaired_from": f["repaired_from"]})
    audit.record_studies(catalog, "scrub-finding", actor, per,
                         outcome_of=lambda d: "failure" if any(
                             x["kind"] == "unrecoverable" for x in d["findings"]) else "success")
    if j["orphans"]:
        audit.record_quietly(catalog, audit.Event("scrub-finding", actor=actor, source=audit.host(),
                                                  detail={"run_id": j["run_id"],
                                                          "orphans": j["orphans"]}))


def audit_volumes(catalog, actor: str, j: dict) -> None:  # noqa: ANN001
    """One audit record per volume written (its barcode and counts, no patient)."""
    for v in j["volumes"]:
        audit.record_quietly(catalog, audit.Event(
            "dr-volume-written", actor=actor, source=audit.host(),
            detail={k: v[k] for k in ("barcode", "sequence", "segments", "studies", "bytes",
                                      "sha256", "continues")} | {"volume_set": j["volume_set"]}))


def audit_drill(catalog, actor: str, j: dict) -> None:  # noqa: ANN001
    """The drill as one record, and one per study it restored (patients touched)."""
    audit.record_quietly(catalog, audit.Event(
        "drill", "success" if j["ok"] else "failure", actor, audit.host(),
        detail={"drill_id": j["drill_id"], "seed": j["seed"], "tiers": list(j["figures"]),
                "failures": len(j["failures"])}))
    per = {uid: {"drill_id": j["drill_id"], "tier": t}
           for t, f in j["figures"].items() for uid in f["sampled"]}
    audit.record_studies(catalog, "retrieve", actor, per)
