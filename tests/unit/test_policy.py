"""The lifecycle policy as a pure function: every condition and exception."""
from datetime import datetime, timedelta, timezone

import pytest

from archive.config.schema import LifecycleRule, LifecycleSettings
from tiers.policy import StudyFacts, decide

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def facts(**kw) -> StudyFacts:
    base = dict(study_fk=1, study_uid="1.2.3", patient_id="P1", study_date="20200101",
                calling_ae="CT1", first_received_at=NOW - timedelta(days=400),
                last_received_at=NOW - timedelta(days=400), modalities={"CT"},
                online_instances=3, online_bytes=300)
    base.update(kw)
    return StudyFacts(**base)


def policy(*rules: LifecycleRule, **kw) -> LifecycleSettings:
    return LifecycleSettings(rules=rules or (LifecycleRule(name="old", older_than_days=365),),
                             **kw)


def test_old_study_moves_and_names_its_rule():
    d = decide(facts(), policy(), NOW)
    assert d.migrate and d.reason == "old"


def test_age_from_study_date_vs_received():
    recent_date = facts(study_date=(NOW - timedelta(days=10)).strftime("%Y%m%d"))
    assert not decide(recent_date, policy(), NOW).migrate
    by_received = LifecycleRule(name="r", older_than_days=365, age_from="received")
    assert decide(recent_date, policy(by_received), NOW).migrate


@pytest.mark.parametrize("bad_date", ["", "2020", "20201345", "abcdefgh", "20200230"])
def test_missing_or_invalid_study_date_ages_by_first_receipt(bad_date):
    assert decide(facts(study_date=bad_date), policy(), NOW).migrate
    young = facts(study_date=bad_date, first_received_at=NOW - timedelta(days=40),
                  last_received_at=NOW - timedelta(days=40))
    assert not decide(young, policy(), NOW).migrate


def test_min_online_days_wins_over_every_rule():
    d = decide(facts(last_received_at=NOW - timedelta(days=5)), policy(min_online_days=30), NOW)
    assert not d.migrate and d.reason == "min_online_days"
    assert decide(facts(last_received_at=NOW - timedelta(days=5)),
                  policy(min_online_days=0), NOW).migrate


def test_recalled_study_stays_for_keep_recalled_days():
    f = facts(recalled_at=NOW - timedelta(days=2))
    d = decide(f, policy(keep_recalled_days=7), NOW)
    assert not d.migrate and d.reason == "keep_recalled_days"
    assert decide(facts(recalled_at=NOW - timedelta(days=8)), policy(keep_recalled_days=7), NOW).migrate


def test_never_migrate_lists():
    assert decide(facts(), policy(never_migrate_studies=("1.2.3",)), NOW).reason == "never_migrate_studies"
    assert decide(facts(), policy(never_migrate_patients=("P1",)), NOW).reason == "never_migrate_patients"
    assert decide(facts(), policy(never_migrate_patients=("P2",)), NOW).migrate


def test_not_accessed_counts_from_latest_touch():
    rule = LifecycleRule(name="cold", not_accessed_days=90)
    assert decide(facts(), policy(rule), NOW).migrate
    touched = facts(last_access_at=NOW - timedelta(days=31))
    assert not decide(touched, policy(rule), NOW).migrate


def test_modality_and_calling_ae_conditions_all_must_hold():
    rule = LifecycleRule(name="mg", older_than_days=365, modalities=("MG", "CR"), calling_aes=("CT1",))
    assert not decide(facts(), policy(rule), NOW).migrate                      # CT, not MG
    assert decide(facts(modalities={"MG", "SR"}), policy(rule), NOW).migrate
    assert not decide(facts(modalities={"MG"}, calling_ae="OTHER"), policy(rule), NOW).migrate


def test_first_matching_rule_wins_and_no_match_stays():
    a = LifecycleRule(name="a", older_than_days=1000)
    b = LifecycleRule(name="b", older_than_days=100)
    assert decide(facts(), policy(a, b), NOW).reason == "a"
    assert decide(facts(study_date="20250101"), policy(a, b), NOW).reason == "b"
    assert decide(facts(study_date="20260101"), policy(a), NOW).reason == "no rule matches"


def test_naive_catalog_times_are_treated_as_utc():
    f = facts(last_received_at=(NOW - timedelta(days=400)).replace(tzinfo=None),
              first_received_at=(NOW - timedelta(days=400)).replace(tzinfo=None))
    assert decide(f, policy(), NOW).migrate
