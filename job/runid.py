"""Run ids: generated for a one-off run, or derived from the Kubernetes Job whose pods retry the same run."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch: no trailing newline


def generate_run_id() -> str:
    """A sortable, unique run id: UTC time plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# A CronJob names each Job "<cronjob name>-<scheduled time in minutes since the Unix epoch>" (the 11 characters
# the Kubernetes documentation says it appends to the name).
_SCHEDULED_JOB = re.compile(r"^(?P<cronjob>.+)-(?P<minutes>\d{8,10})$")


def _scheduled_time(minutes: str) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(minutes) * 60, UTC)
    except (OverflowError, OSError, ValueError):  # past year 9999
        return None


def kubernetes_run_id(job_name: str, job_uid: str, group: str, index: str | None = None) -> str:
    """The run id of a pod of a Kubernetes Job: the same for every retried pod of the Job, unique per Job.

    A Job that the CronJob named `group` scheduled:  <scheduled UTC time>-<cronjob>-<uid[:8]>
        e.g. 20261129T0200Z-vat-job-nightly-3f2a9c1d   (readable date, sorts by night)
    any other Job (one-off, sweep):                    <job name>-<uid[:8]>[-<completion index>]
        e.g. vat-sweep-x7k2p-3f2a9c1d-2
    """
    uid = re.sub(r"[^A-Za-z0-9]", "", job_uid)[:8].lower()
    scheduled = _SCHEDULED_JOB.match(job_name)
    when = _scheduled_time(scheduled["minutes"]) if scheduled and scheduled["cronjob"] == group else None
    if when is not None:
        run_id = f"{when:%Y%m%dT%H%MZ}-{group}-{uid}"
    else:  # not a CronJob's Job (or a time no CronJob writes): the Job's own name
        run_id = f"{job_name}-{uid}"
    return run_id if index is None else f"{run_id}-{index}"


# A Job made from a CronJob: scheduled, <cronjob>-<minutes> (8-10 digits); by hand, as the README does it,
# <cronjob>-<UTC time as digits>.
_FROM_CRONJOB = re.compile(r"^(?P<cronjob>.+)-\d{8,}$")


def cronjob_group(job_name: str) -> str:
    """The group of a Job's runs when VAT_RUN_GROUP is the Job's name (downward API): for a Job of a CronJob, the
    CronJob's name, whatever an overlay's namePrefix made of it; any other Job (a sweep) is its own group.

        team-a-vat-job-nightly-29412360       -> team-a-vat-job-nightly   (scheduled)
        team-a-vat-job-nightly-20261129153000 -> team-a-vat-job-nightly   (by hand, README's command)
        vat-sweep-q9w8e                       -> vat-sweep-q9w8e
    """
    scheduled = _FROM_CRONJOB.match(job_name)
    return scheduled["cronjob"] if scheduled else job_name
