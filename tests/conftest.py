import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from job.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = Path(os.environ.get("TEST_MNIST_DIR", REPO.parent / "shared" / "mnist"))
# In CI (CI=true, as .ci/run sets it) or with VAT_REQUIRE_TOOLS=1, a missing command-line tool (kubectl,
# kubernetes-validate, hadolint, promtool, prometheus-pushgateway) fails its tests instead of skipping them.
REQUIRE_TOOLS = os.environ.get("CI", "").lower() == "true" or os.environ.get("VAT_REQUIRE_TOOLS") == "1"


def unavailable(reason: str) -> None:
    if REQUIRE_TOOLS:
        pytest.fail(f"{reason} (CI=true or VAT_REQUIRE_TOOLS=1: required)")
    pytest.skip(reason)


def tool(name: str) -> str:
    """A command: the virtual environment's (pip-installed tools), else the system's."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        unavailable(f"{name} is not installed")
    return found


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
    if not (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found under {SHARED_MNIST}")
    return SHARED_MNIST


@pytest.fixture(scope="session")
def mnist_split(mnist_dir):
    from job.data import load_mnist, raw_dir

    return load_mnist(raw_dir(mnist_dir), 42, 1, 100)


DEFAULT_WIDTH = {"HIDDEN_UNITS": str(Settings.model_fields["hidden_units"].default)}


def job_env(tmp_path: Path, mnist_dir: Path, **settings) -> dict:
    """Environment for a short job run in a subprocess (a few steps, no plots unless asked)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("VAT_")}
    env.update(
        VAT_DATA_DIR=str(mnist_dir),
        VAT_OUTPUT_DIR=str(tmp_path / "runs"),
        VAT_DEVICE="cpu",
        VAT_BASELINE_STEPS="6",
        VAT_TRAIN_STEPS="4",
        VAT_UNLABELED_BATCH_SIZE="64",
        VAT_CHECKPOINT_EVERY="2",
        VAT_EVAL_BATCH_SIZE="5000",
        VAT_PLOTS="false",
        # The article's width: the plumbing is the same and checkpoints are about 9x smaller (5.6 MB, not 52), which
        # keeps the suite's thirty-odd job runs fast. The end-to-end fixtures of test_job and test_storage pass
        # DEFAULT_WIDTH, so the default's large checkpoints go through the job and the bucket too.
        VAT_HIDDEN_UNITS="100",
        PYTHONWARNINGS="default",
    )
    env.update({f"VAT_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def sigterm_during_vat(env: dict) -> tuple[int, str, float]:
    """Start the job, send SIGTERM once VAT is under way; return (exit code, the rest of stdout, seconds to exit)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "job"], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    for line in process.stdout:
        record = json.loads(line)
        if record["event"] == "progress" and record["phase"] == "vat":
            break
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    rest = process.stdout.read()
    code = process.wait(timeout=30)
    return code, rest, time.monotonic() - sent


@contextlib.contextmanager
def moto_on_loopback(bucket: str) -> Iterator[dict]:
    """moto's S3 server on 127.0.0.1 (a free port) holding one empty bucket: its endpoint, the AWS_* variables
    a job needs to reach it, and a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    try:
        yield {"endpoint": endpoint, "env": credentials, "client": client}
    finally:
        server.stop()


S3RVER = REPO / ".ci" / "s3rver" / "node_modules" / ".bin" / "s3rver"


@contextlib.contextmanager
def s3rver_on_loopback(bucket: str) -> Iterator[dict]:
    """s3rver (a second S3 implementation, in Node.js; it ignores conditional writes) on 127.0.0.1 with one bucket.
    Installed by .ci/run (`npm ci --prefix .ci/s3rver`); without it the test is skipped, and fails under CI."""
    import shutil
    import socket
    import subprocess
    import tempfile
    import time

    import boto3

    if not S3RVER.exists() or not shutil.which("node"):
        message = f"s3rver not installed ({S3RVER}): npm ci --prefix .ci/s3rver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="s3rver-")
    process = subprocess.Popen(
        [
            str(S3RVER),
            "--directory",
            folder,
            "--address",
            "127.0.0.1",
            "--port",
            str(port),
            "--silent",
            "--configure-bucket",
            bucket,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    credentials = {  # s3rver's fixed key pair; it checks signatures
        "AWS_ACCESS_KEY_ID": "S3RVER",
        "AWS_SECRET_ACCESS_KEY": "S3RVER",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="S3RVER", aws_secret_access_key="S3RVER", region_name="us-east-1"
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.head_bucket(Bucket=bucket)
                break
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.2)
        yield {"endpoint": endpoint, "env": credentials, "client": client}
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def run_job_cli(
    env: dict,
    *args: str,
    cwd: Path = REPO,
    timeout: float = 300,
    umask: int | None = None,
    limit_file_bytes: int | None = None,
):
    """`python -m job ARGS` in a subprocess, output captured; optionally under a umask or a file-size limit (EFBIG:
    what a full disk looks like to the process)."""
    import resource
    import subprocess
    import sys

    def limits() -> None:
        if umask is not None:
            os.umask(umask)
        if limit_file_bytes:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "job", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limits,
    )
