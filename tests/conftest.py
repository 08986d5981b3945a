"""Fixtures, and the rules of a test run: under CI=true a skipped test fails, and `--min-passed N` fails a run
that passed fewer tests than N. Helpers live in tests/support.py."""

import json
import os
from pathlib import Path

import pytest

from tests.support import (
    BUCKET,
    CI,
    LEARNING_STEPS,
    MNIST_CACHE,
    NOT_APPLICABLE,
    SHARED_MNIST,
    job_env,
    moto_on_loopback,
    run_job,
    unavailable,
)

# --- the rules of a run --------------------------------------------------------------------------------------


def pytest_addoption(parser):
    parser.addoption(
        "--min-passed",
        type=int,
        default=0,
        help="fail the run when fewer tests than this pass (CI: a run that lost tests to skips or a filter)",
    )


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one of -n's workers, one per core
        import torch

        # One thread per worker, as support.clean_environ gives the job's subprocesses: with a thread per core in
        # every process the cores are oversubscribed, and OpenMP's threads spin while they wait for each other.
        torch.set_num_threads(1)


def skip_reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr).removeprefix("Skipped: ")


def strict(report) -> None:
    """Under CI=true a skip is a failure (what a machine lacks, CI must install), unless `not_applicable`."""
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if not reason.startswith(NOT_APPLICABLE):
            report.outcome = "failed"
            report.longrepr = f"skipped, and CI=true fails every skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    strict(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    strict(outcome.get_result())


PASSED = {"tests": 0}


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed and not hasattr(report, "wasxfail"):
        PASSED["tests"] += 1


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller counts every worker's passes
        return
    floor = session.config.getoption("--min-passed")
    passed = PASSED["tests"]
    if floor and passed < floor and exitstatus == 0:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter:
            reporter.write_line(f"FAILED: {passed} tests passed, fewer than --min-passed {floor}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clean_vat_environment(monkeypatch):
    """Tests start from the defaults: no VAT_* variable of the developer's shell leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("VAT_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _logging_stays_in_its_test():
    """A test that configures the job's logging (root handler, structlog, excepthook) leaves the process as it was:
    otherwise an in-process server's request lines (werkzeug) reach a later test's captured stdout."""
    import logging
    import sys

    import structlog

    root = logging.getLogger()
    handlers, level, hook = list(root.handlers), root.level, sys.excepthook
    yield
    root.handlers, sys.excepthook = handlers, hook
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _registered_secrets_stay_in_their_test():
    """job.untrusted masks every secret registered in this process: one test's secrets must not mask another's
    output (a generated "000000" would turn a later table's 0.9000000 into stars)."""
    from job import untrusted

    saved = set(untrusted._registered)
    yield
    untrusted._registered.clear()
    untrusted._registered.update(saved)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Real MNIST: ../shared/mnist (or TEST_MNIST_DIR), else downloaded the way the job does it (its downloader,
    its mirrors, or TEST_MNIST_MIRRORS, a JSON list of URLs) into TEST_MNIST_CACHE (~/.cache/vat-job-tests/mnist).
    Neither: skipped, and failed under CI."""
    if (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return SHARED_MNIST
    from job.data import DataError, ensure_mnist
    from job.settings import Settings

    # The tests' own variable: every VAT_* variable is cleared for the tests (_clean_vat_environment).
    mirrors = json.loads(os.environ.get("TEST_MNIST_MIRRORS", "null")) or Settings.model_fields["mnist_mirrors"].default
    try:
        ensure_mnist(MNIST_CACHE, mirrors, retries=2, timeout_s=30, backoff_s=1)
    except DataError as error:
        unavailable(
            f"real MNIST is not under {SHARED_MNIST} (TEST_MNIST_DIR) and could not be downloaded from "
            f"{', '.join(mirrors)} (TEST_MNIST_MIRRORS): {error}"
        )
    return MNIST_CACHE


@pytest.fixture(scope="session")
def mnist_split(mnist_dir):
    from job.data import load_mnist, raw_dir

    return load_mnist(raw_dir(mnist_dir), 42, 1, 100)


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1 with the bucket BUCKET, one per test module."""
    with moto_on_loopback(BUCKET) as server:
        yield server


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    """This process talks to s3_server through boto3's own chain (the AWS_* variables), as the job does."""
    for name, value in s3_server["env"].items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory, mnist_dir) -> Path:
    """One uninterrupted run with LEARNING_STEPS (the reference of every SIGTERM-and-resume test), evaluated on all
    test images (the learning and label tests read its report): its folder."""
    import fcntl
    import shutil

    # Under pytest-xdist each worker has a session of its own: the run is made once, by the first worker that asks,
    # in the folder the workers share, while the others wait on the lock. Tests only read it.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    tmp, report = shared / "learned", shared / "learned" / "runs" / "learned" / "report.json"
    with open(shared / "learned.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not report.is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            result = run_job(job_env(tmp, mnist_dir, RUN_ID="learned", EVAL_IMAGES="0", **LEARNING_STEPS))
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return report.parent
