"""The metrics a run pushes when it ends, scraped back from a real Pushgateway (Debian's prometheus-pushgateway,
started here on a free loopback port with its own storage) after real runs of the job against an S3 server: a
night that succeeds and promotes, one that the gate refuses, and one that cannot reach its bucket."""

import json
import math
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from job import metrics
from tests.support import events, free_port, job_env, moto_on_loopback, run_job, tool, wait_until

GROUP = "team-a-vat-job-nightly"
ACCURACIES = {(model, test_set) for model in metrics.MODELS for test_set in metrics.TEST_SETS}


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory):
    address = f"127.0.0.1:{free_port()}"
    storage = tmp_path_factory.mktemp("pushgateway") / "metrics"
    process = subprocess.Popen(
        [tool("prometheus-pushgateway"), f"--web.listen-address={address}", f"--persistence.file={storage}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(
        lambda: (
            process.poll() is None and urllib.request.urlopen(f"http://{address}/-/ready", timeout=2).close() is None
        ),
        limit_s=30,
        what="the Pushgateway ready",
    )
    yield f"http://{address}"
    process.terminate()
    process.wait(timeout=10)


def scrape(url: str, group: str) -> dict[str, dict[frozenset, float]]:
    """The Pushgateway's /metrics for one group of vat-job: metric name -> {labels but the group's: value}."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    found: dict[str, dict[frozenset, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("job", None) == metrics.JOB and labels.pop("run_group", None) == group:
                labels.pop("instance", None)
                found.setdefault(sample.name, {})[frozenset(labels.items())] = sample.value
    return found


def accuracies(scraped: dict, name: str = "vat_job_accuracy") -> dict[tuple[str, str], float]:
    return {(dict(k)["model"], dict(k)["test_set"]): v for k, v in scraped[name].items()}


def reported(folder) -> dict[tuple[str, str], float]:
    report = json.loads((folder / "report.json").read_text())
    return {(m, t): report["models"][m][t]["accuracy"] for m, t in ACCURACIES}


@pytest.fixture(scope="module")
def nights(tmp_path_factory, mnist_dir, pushgateway):
    """Three runs, one after the other, each scraped right after it ended."""
    tmp = tmp_path_factory.mktemp("nights")
    termination = tmp / "termination-log"  # what the kubelet mounts at /dev/termination-log
    termination.touch()
    with moto_on_loopback("vat-results") as s3:
        endpoint = {k: v for k, v in s3["env"].items() if k != "AWS_ENDPOINT_URL"}
        endpoint["AWS_ENDPOINT_URL_S3"] = s3["endpoint"]  # as the ConfigMap sets it: S3's own, not the global one

        def night(run_id, group=GROUP, **settings):
            env = job_env(
                tmp,
                mnist_dir,
                RUN_ID=run_id,
                RUN_GROUP=group,
                S3_BUCKET="vat-results",
                S3_PREFIX="metrics",
                PROMOTE_TO="latest",
                EVAL_IMAGES="0",
                PUSHGATEWAY_URL=pushgateway,
                TERMINATION_MESSAGE_PATH=termination,
                **settings,
            )
            env.update(endpoint)
            env.pop("AWS_ENDPOINT_URL", None)
            began = time.time()
            result = run_job(env)
            return {"result": result, "began": began, "ended": time.time(), "scraped": scrape(pushgateway, group)}

        promoted = night("night-1", PROMOTE_MIN_ACCURACY="0")
        assert termination.read_text() == "", "nothing to say about a success"
        refused = night("night-2", PROMOTE_MIN_ACCURACY="0.999")  # a few updates: far below
        refused["termination"] = termination.read_text()
        client = s3["client"]

        def stored(key):
            return json.loads(client.get_object(Bucket="vat-results", Key=f"metrics/{key}")["Body"].read())

        listing = client.list_objects_v2(Bucket="vat-results", Prefix="metrics/runs/night-2/")["Contents"]
        bucket = {  # what the gate left in the bucket, read while the server is up
            "pointer": stored("latest/pointer.json"),
            "refused_run": {o["Key"] for o in listing},
            "refused_report": stored("runs/night-2/report.json"),
        }
        endpoint["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        unreachable = night("night-3", group="broken-nightly", S3_MAX_ATTEMPTS="1")
        after = scrape(pushgateway, GROUP)
    return {
        "runs": tmp / "runs",
        "promoted": promoted,
        "refused": refused,
        "unreachable": unreachable,
        "after": after,
        "bucket": bucket,
    }


@pytest.mark.slow
def test_a_successful_night_pushes_its_accuracy_durations_verdict_exit_code_and_success(nights):
    night = nights["promoted"]
    assert night["result"].returncode == 0, night["result"].stdout[-3000:]
    assert '"event": "metrics_pushed"' in night["result"].stdout
    scraped = night["scraped"]
    assert scraped["vat_job_exit_code"] == {frozenset({("run_id", "night-1")}): 0}
    verdicts = {dict(k)["verdict"]: v for k, v in scraped["vat_job_gate_verdict"].items()}
    assert verdicts == {"promoted": 1, "refused": 0, "not_gated": 0}
    assert accuracies(scraped) == reported(nights["runs"] / "night-1")  # seeded_test is the validation set
    assert accuracies(scraped, "vat_job_last_success_accuracy") == accuracies(scraped)
    phases = {dict(k)["phase"]: v for k, v in scraped["vat_job_phase_duration_seconds"].items()}
    assert set(phases) == {"startup", "data", "baseline", "vat", "total"} and all(v > 0 for v in phases.values())
    assert phases["total"] > phases["data"] + phases["baseline"] + phases["vat"]
    (success,) = scraped["vat_job_last_success_timestamp_seconds"].values()
    assert night["began"] < success < night["ended"]


@pytest.mark.slow
def test_a_refused_night_says_so_and_keeps_the_last_success(nights):
    night, before = nights["refused"], nights["promoted"]["scraped"]
    assert night["result"].returncode == 6, night["result"].stdout[-3000:]
    scraped = night["scraped"]
    assert scraped["vat_job_exit_code"] == {frozenset({("run_id", "night-2")}): 6}, "the latest run's only"
    verdicts = {dict(k)["verdict"]: v for k, v in scraped["vat_job_gate_verdict"].items()}
    assert verdicts == {"promoted": 0, "refused": 1, "not_gated": 0}
    assert accuracies(scraped) == reported(nights["runs"] / "night-2"), "the refused run's own accuracy"
    for kept in ("vat_job_last_success_timestamp_seconds", "vat_job_last_success_accuracy"):
        assert scraped[kept] == before[kept], "a failed night leaves the last success as it was"
    assert night["termination"].startswith("quality gate refused: not promoted: accuracy "), night["termination"]


@pytest.mark.slow
def test_the_job_promotes_then_a_refused_run_exits_6_and_stays_in_the_bucket(nights):
    """The gate end to end (job/promote.py has its own tests): night-1 promoted, night-2 refused (exit 6, its last
    line says why) and kept whole in the bucket, the pointer still on night-1."""
    promoted, refused = nights["promoted"]["result"], nights["refused"]["result"]
    names = [e["event"] for e in events(promoted.stdout)]
    assert names[-1] == "summary" and "promoted" in names and names.index("promoted") > names.index("run_finished")
    (why,) = [e for e in events(refused.stdout) if e["event"] == "quality_gate_refused"]
    assert why["exit_code"] == 6 and "below the minimum" in why["message"]
    assert "promoted" not in [e["event"] for e in events(refused.stdout)]
    bucket = nights["bucket"]
    assert bucket["pointer"]["run_id"] == "night-1" and bucket["pointer"]["group"] == GROUP
    assert "metrics/runs/night-2/manifest.json" in bucket["refused_run"], "the refused run is complete and kept"
    assert bucket["refused_report"]["group"] == GROUP


@pytest.mark.slow
def test_a_night_that_cannot_reach_its_bucket_pushes_its_exit_code_and_no_success(nights):
    night = nights["unreachable"]
    assert night["result"].returncode == 4, night["result"].stdout[-3000:]
    scraped = night["scraped"]
    assert scraped["vat_job_exit_code"] == {frozenset({("run_id", "night-3")}): 4}
    verdicts = {dict(k)["verdict"]: v for k, v in scraped["vat_job_gate_verdict"].items()}
    assert verdicts == {"promoted": 0, "refused": 0, "not_gated": 1}, "it never reached the gate"
    assert set(accuracies(scraped)) == ACCURACIES and all(math.isnan(v) for v in accuracies(scraped).values())
    assert [dict(k)["phase"] for k in scraped["vat_job_phase_duration_seconds"]] == ["total"]
    assert "vat_job_last_success_timestamp_seconds" not in scraped and "vat_job_last_success_accuracy" not in scraped
    assert nights["after"] == nights["refused"]["scraped"], "another group is left alone"


def test_a_pushgateway_that_never_answers_costs_the_timeout_and_no_more():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        registry = metrics.run_metrics("r", 0, "not_gated", None, 1.0)
        began = time.monotonic()
        problem = metrics.push(f"http://127.0.0.1:{silent.getsockname()[1]}", GROUP, registry, timeout_s=1.0)
        assert problem and time.monotonic() - began < 2.5
    refused = metrics.push(f"http://127.0.0.1:{free_port()}", GROUP, registry, timeout_s=5.0)
    assert refused and "Connection refused" in refused


def test_a_failed_push_is_one_warning_and_never_an_error(tmp_path):
    class Log:
        lines = []

        def warning(self, event, **fields):
            self.lines.append(("warning", event, fields))

        info = error = warning

    class Settings:
        run_id, run_group, output_dir = "r", GROUP, tmp_path
        pushgateway_url, pushgateway_timeout_s = f"http://127.0.0.1:{free_port()}", 2.0

    metrics.push_run(Settings(), 4, "not_gated", None, 3.0, Log())
    ((level, event, fields),) = Log.lines
    assert (level, event, fields["exit_code"]) == ("warning", "metrics_push_failed", 4)
