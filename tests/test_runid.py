"""Run identity on Kubernetes: readable, unique per Job, the same for every retried pod of a Job."""

import pytest

from job.runid import cronjob_group, kubernetes_run_id
from job.settings import ConfigError, load_settings

UID = "3f2a9c1d-7b4e-4c1a-9e0f-0123456789ab"


def test_a_scheduled_nightly_run_shows_its_scheduled_time_and_the_jobs_uid():
    # The CronJob controller names the Job <cronjob>-<scheduled minute since the epoch>: 02:00 UTC, 29 Nov 2026.
    minutes = 1795917600 // 60
    run_id = kubernetes_run_id(f"vat-job-nightly-{minutes}", UID, "vat-job-nightly")
    assert run_id == "20261129T0200Z-vat-job-nightly-3f2a9c1d"


def test_nightly_ids_sort_by_night():
    ids = [kubernetes_run_id(f"vat-job-nightly-{m}", UID, "vat-job-nightly") for m in (29930521, 29929081)]
    assert sorted(ids) == ids[::-1]


def test_other_jobs_keep_their_name_and_a_sweep_pod_adds_its_index():
    assert kubernetes_run_id("vat-job-x7k2p", UID, "one-off") == "vat-job-x7k2p-3f2a9c1d"
    assert kubernetes_run_id("vat-sweep-q9w8e", UID, "vat-sweep-q9w8e", "2") == "vat-sweep-q9w8e-3f2a9c1d-2"
    # A Job made by hand from the CronJob (kubectl create job --from=cronjob/...) is not a scheduled one.
    assert kubernetes_run_id("rerun-12345678", UID, "vat-job-nightly") == "rerun-12345678-3f2a9c1d"


def test_settings_derive_the_run_id_from_the_job_and_an_explicit_one_wins(monkeypatch):
    monkeypatch.setenv("VAT_JOB_NAME", "vat-sweep-q9w8e")
    monkeypatch.setenv("VAT_JOB_UID", UID)
    monkeypatch.setenv("VAT_RUN_GROUP", "vat-sweep-q9w8e")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    first, retried = load_settings(env_file=None), load_settings(env_file=None)
    assert first.run_id == retried.run_id == "vat-sweep-q9w8e-3f2a9c1d-1", "a retried pod resumes the same run"
    assert first.run_group == "vat-sweep-q9w8e"
    monkeypatch.setenv("VAT_RUN_ID", "resume-this")
    assert load_settings(env_file=None).run_id == "resume-this"


@pytest.mark.parametrize(
    "job_name,group",
    [
        ("vat-job-nightly-29930520", "vat-job-nightly"),  # scheduled: minutes since the epoch
        ("team-a-vat-job-nightly-29930520", "team-a-vat-job-nightly"),  # under an overlay's namePrefix
        ("team-a-vat-job-nightly-20261129153000", "team-a-vat-job-nightly"),  # by hand, as the README does it
        ("vat-sweep-q9w8e", "vat-sweep-q9w8e"),  # not a CronJob's: its own group
        ("vat-sweep-24567", "vat-sweep-24567"),  # generateName's five characters are never eight digits
    ],
)
def test_the_group_taken_from_a_job_is_its_cronjobs_name(job_name, group):
    assert cronjob_group(job_name) == group


def test_settings_take_the_group_from_the_job_only_when_it_is_the_jobs_name(monkeypatch):
    monkeypatch.setenv("VAT_JOB_NAME", "team-a-vat-job-nightly-29930520")
    monkeypatch.setenv("VAT_JOB_UID", UID)
    monkeypatch.setenv("VAT_RUN_GROUP", "team-a-vat-job-nightly-29930520")  # the downward API's value
    settings = load_settings(env_file=None)
    assert settings.run_group == "team-a-vat-job-nightly"
    assert settings.run_id == "20261128T0200Z-team-a-vat-job-nightly-3f2a9c1d", "still read as a scheduled run"
    monkeypatch.setenv("VAT_RUN_GROUP", "one-off")  # a literal group is kept as it is
    assert load_settings(env_file=None).run_group == "one-off"


def test_the_default_group_is_one_off_and_a_group_is_a_path_segment(monkeypatch):
    assert load_settings(env_file=None).run_group == "one-off"
    monkeypatch.setenv("VAT_RUN_GROUP", "../x")
    with pytest.raises(ConfigError, match="VAT_RUN_GROUP"):
        load_settings(env_file=None)


def test_promotion_needs_a_bucket(monkeypatch):
    monkeypatch.setenv("VAT_PROMOTE_TO", "latest")
    with pytest.raises(ConfigError, match="VAT_PROMOTE_TO=latest needs VAT_S3_BUCKET"):
        load_settings(env_file=None)
    monkeypatch.setenv("VAT_S3_BUCKET", "b")
    assert load_settings(env_file=None).promote_to == "latest"
