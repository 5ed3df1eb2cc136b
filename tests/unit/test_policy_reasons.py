"""Why a study stays online: the policy names the rule and the condition that kept it."""
from datetime import timedelta

from archive.config.schema import LifecycleRule
from tests.unit.test_policy import NOW, facts, policy
from tiers.policy import decide


def test_each_exception_names_its_key_and_value():
    d = decide(facts(last_received_at=NOW - timedelta(days=5)), policy(min_online_days=30), NOW)
    assert (d.reason, d.detail) == ("min_online_days", "received within min_online_days = 30")
    d = decide(facts(recalled_at=NOW - timedelta(days=1)), policy(keep_recalled_days=7), NOW)
    assert d.detail == "recalled within keep_recalled_days = 7"
    d = decide(facts(), policy(never_migrate_studies=("1.2.3",)), NOW)
    assert d.detail == "listed in never_migrate_studies"
    d = decide(facts(), policy(never_migrate_patients=("P1",)), NOW)
    assert d.detail == "its patient is listed in never_migrate_patients" and "P1" not in d.detail


def test_no_rule_matches_says_which_condition_of_each_rule_failed():
    rules = (LifecycleRule(name="old", older_than_days=3650),
             LifecycleRule(name="idle", not_accessed_days=500),
             LifecycleRule(name="mammo", modalities=("MG",)),
             LifecycleRule(name="from-pacs", calling_aes=("PACS1",)))
    d = decide(facts(), policy(*rules), NOW)
    assert not d.migrate and d.reason == "no rule matches"
    assert d.detail == ("old: not older than older_than_days = 3650 (by study_date); "
                        "idle: accessed within not_accessed_days = 500; "
                        "mammo: no series of modalities MG; "
                        "from-pacs: calling AE not in calling_aes PACS1")


def test_a_moving_study_has_no_detail_and_patient_data_never_shows():
    assert decide(facts(), policy(), NOW).detail == ""
    d = decide(facts(study_date="20260101", patient_id="SECRET-ID"), policy(), NOW)
    assert "SECRET-ID" not in d.detail and "2026" not in d.detail
