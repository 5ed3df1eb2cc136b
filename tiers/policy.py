"""The lifecycle policy: which online studies move to the object tier now.

``decide`` is a pure function of one study's facts, the [lifecycle] settings
and the time, so every rule is unit-tested without a catalog. ``candidates``
gathers the facts in a few set-based queries.

Order of evaluation (the first that applies wins):
1. ``never_migrate_studies`` / ``never_migrate_patients``: stays online.
2. received within ``min_online_days`` (the newest object of the study): stays.
3. recalled within ``keep_recalled_days``: stays.
4. the first rule whose every condition holds: moves, named by that rule.
5. otherwise: stays ("no rule matches").

Ages: ``age_from = "study_date"`` ages a study by its StudyDate; a study whose
StudyDate is missing or not a valid date is aged by when we first received it.
``not_accessed_days`` counts from the latest of last access, recall and
receipt.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

from sqlalchemy import and_, case, exists, func, select
from sqlalchemy.orm import Session

from archive.catalog.models import Copy, Instance, Patient, Series, Study
from archive.config.schema import LifecycleRule, LifecycleSettings


@dataclass
class StudyFacts:
    study_fk: int
    study_uid: str
    patient_id: str
    study_date: str
    calling_ae: str
    first_received_at: datetime
    last_received_at: datetime
    last_access_at: datetime | None = None
    recalled_at: datetime | None = None
    modalities: set[str] = field(default_factory=set)
    online_instances: int = 0
    online_bytes: int = 0
    unprotected: int = 0     # online instances without a verified object copy yet


@dataclass(frozen=True)
class Decision:
    migrate: bool
    reason: str          # the rule's name, or why the study stays (a config key)
    detail: str = ""     # why it stays, in words: keys and their values, never patient data


def _aware(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _study_day(facts: StudyFacts) -> datetime:
    d = facts.study_date.strip()
    try:
        if len(d) == 8 and d.isdigit():
            day = date(int(d[0:4]), int(d[4:6]), int(d[6:8]))
            return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    except ValueError:
        pass
    return _aware(facts.first_received_at)  # type: ignore[return-value]


def _last_touch(facts: StudyFacts) -> datetime:
    times = [_aware(t) for t in (facts.last_access_at, facts.recalled_at, facts.last_received_at)]
    return max(t for t in times if t is not None)


def rule_miss(rule: LifecycleRule, facts: StudyFacts, now: datetime) -> str | None:
    """The first condition of ``rule`` the study fails, in words; None if it matches.
    Names the rule's keys and values only (no dates, IDs or other patient data)."""
    if rule.older_than_days is not None:
        born = _study_day(facts) if rule.age_from == "study_date" else _aware(facts.first_received_at)
        if now - born < timedelta(days=rule.older_than_days):
            return f"not older than older_than_days = {rule.older_than_days} (by {rule.age_from})"
    if rule.not_accessed_days is not None:
        if now - _last_touch(facts) < timedelta(days=rule.not_accessed_days):
            return f"accessed within not_accessed_days = {rule.not_accessed_days}"
    if rule.modalities and not (facts.modalities & set(rule.modalities)):
        return f"no series of modalities {', '.join(rule.modalities)}"
    if rule.calling_aes and facts.calling_ae not in rule.calling_aes:
        return f"calling AE not in calling_aes {', '.join(rule.calling_aes)}"
    return None


def rule_matches(rule: LifecycleRule, facts: StudyFacts, now: datetime) -> bool:
    return rule_miss(rule, facts, now) is None


def decide(facts: StudyFacts, policy: LifecycleSettings, now: datetime) -> Decision:
    if facts.study_uid in policy.never_migrate_studies:
        return Decision(False, "never_migrate_studies", "listed in never_migrate_studies")
    if facts.patient_id and facts.patient_id in policy.never_migrate_patients:
        return Decision(False, "never_migrate_patients",
                        "its patient is listed in never_migrate_patients")
    if now - _aware(facts.last_received_at) < timedelta(days=policy.min_online_days):
        return Decision(False, "min_online_days",
                        f"received within min_online_days = {policy.min_online_days}")
    recalled = _aware(facts.recalled_at)
    if recalled is not None and now - recalled < timedelta(days=policy.keep_recalled_days):
        return Decision(False, "keep_recalled_days",
                        f"recalled within keep_recalled_days = {policy.keep_recalled_days}")
    misses = []
    for rule in policy.rules:
        miss = rule_miss(rule, facts, now)
        if miss is None:
            return Decision(True, rule.name)
        misses.append(f"{rule.name}: {miss}")
    return Decision(False, "no rule matches", "; ".join(misses) or "no [[lifecycle.rules]]")


def online_copy(sites: list[str]):  # noqa: ANN201 - a SQL expression
    """SQL: the instance still has a copy (not purged) on an online site."""
    return exists().where(Copy.instance_fk == Instance.id, Copy.location.in_(sites),
                          Copy.state.in_(("ok", "missing", "corrupt", "purging")))


def candidates(session: Session, sites: list[str], tier: str, *,
               study_fks: list[int] | None = None,
               received_before: datetime | None = None) -> list[StudyFacts]:
    """Facts of every study with instances still online (optionally only these
    studies, or only those last received before a time), oldest study id first."""
    tier_ok = exists().where(Copy.instance_fk == Instance.id, Copy.location == tier,
                             Copy.state == "ok")
    q = (select(Instance.study_fk, func.count(), func.coalesce(func.sum(Instance.size), 0),
                func.sum(case((tier_ok, 0), else_=1)))
         .where(online_copy(sites)).group_by(Instance.study_fk))
    if study_fks is not None:
        q = q.where(Instance.study_fk.in_(study_fks))
    if received_before is not None:
        q = q.where(exists().where(and_(Study.id == Instance.study_fk,
                                        Study.last_received_at < received_before)))
    online = {fk: (int(n), int(b), int(u or 0)) for fk, n, b, u in session.execute(q)}
    if not online:
        return []
    facts: dict[int, StudyFacts] = {}
    ids = sorted(online)
    for chunk in (ids[i:i + 500] for i in range(0, len(ids), 500)):
        rows = session.execute(
            select(Study, Patient.patient_id).join(Patient, Patient.id == Study.patient_fk)
            .where(Study.id.in_(chunk)))
        for st, pid in rows:
            n, b, u = online[st.id]
            facts[st.id] = StudyFacts(
                st.id, st.study_uid, pid, st.study_date, st.calling_ae, st.first_received_at,
                st.last_received_at, st.last_access_at, st.recalled_at,
                online_instances=n, online_bytes=b, unprotected=u)
        for fk, modality in session.execute(
                select(Series.study_fk, Series.modality).where(Series.study_fk.in_(chunk))):
            if modality:
                facts[fk].modalities.add(modality)
    return [facts[i] for i in ids if i in facts]
