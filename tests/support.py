"""What the tests share, written once: the environment they need, the job in a subprocess, servers on 127.0.0.1.
Fixtures live in conftest.py and use these; a helper that serves one test module stays in that module."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import http.server
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from job.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = Path(os.environ.get("TEST_MNIST_DIR", REPO.parent / "shared" / "mnist"))
# Where the tests download MNIST with the job's own downloader when SHARED_MNIST is not there.
MNIST_CACHE = Path(os.environ.get("TEST_MNIST_CACHE", Path.home() / ".cache" / "vat-job-tests" / "mnist"))
# CI=true (as .ci/run sets it): every skip of a test for want of something in the environment fails instead
# (conftest.py's report hook); only a skip through `not_applicable` stays a skip.
CI = os.environ.get("CI", "").lower() == "true"
NOT_APPLICABLE = "not applicable on this machine: "


# --- what the environment must provide -----------------------------------------------------------------------


def unavailable(reason: str) -> NoReturn:
    """Something the test needs is missing (a tool, MNIST, a Docker engine): skipped here, a failure under CI."""
    pytest.skip(reason)


def not_applicable(reason: str) -> NoReturn:
    """The test checks a kind of machine this is not (a GPU run without a GPU): a skip, even under CI."""
    pytest.skip(NOT_APPLICABLE + reason)


def tool(name: str) -> str:
    """A command: the virtual environment's (pip-installed tools), else the system's."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        unavailable(f"{name} is not installed")
    return found


# --- the job in a subprocess ---------------------------------------------------------------------------------


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without VAT_* variables, importing this checkout's `job` whatever the folder."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("VAT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    # One torch thread: the suite runs a test per core and the job beside it (a pair of jobs took 14.4 s with one
    # thread each, 16.4-17.9 s with torch's default of one per core, which oversubscribes the cores).
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


DEFAULT_WIDTH = {"HIDDEN_UNITS": str(Settings.model_fields["hidden_units"].default)}


def job_env(tmp_path: Path, mnist_dir: Path, **settings: Any) -> dict[str, str]:
    """Environment for a short job run in a subprocess (a few steps, no plots unless asked)."""
    env = clean_environ(
        VAT_DATA_DIR=str(mnist_dir),
        VAT_OUTPUT_DIR=str(tmp_path / "runs"),
        VAT_DEVICE="cpu",
        VAT_BASELINE_STEPS="6",
        VAT_TRAIN_STEPS="4",
        VAT_UNLABELED_BATCH_SIZE="64",
        VAT_CHECKPOINT_EVERY="2",
        VAT_EVAL_BATCH_SIZE="200",
        # 200 images of each test set, not 10,000: evaluating all was two thirds of a short run's time (1,000 still
        # 1.7 s of its 13 when measured). The runs that check what was learnt and on which labels (LEARNING_STEPS,
        # the promotion tests) evaluate on all.
        VAT_EVAL_IMAGES="200",
        VAT_PLOTS="false",
        # The article's width: the plumbing is the same and checkpoints are about 9x smaller (5.6 MB, not 52), which
        # keeps the suite's thirty-odd job runs fast. The end-to-end fixtures of test_job and test_storage pass
        # DEFAULT_WIDTH, so the default's large checkpoints go through the job and the bucket too.
        VAT_HIDDEN_UNITS="100",
        PYTHONWARNINGS="default",
    )
    env.update({f"VAT_{k.upper()}": str(v) for k, v in settings.items()})
    return env


BUCKET, PREFIX = "vat-results", "team/vat"  # the bucket of the S3 servers the tests start, and a prefix in it


def s3_job_env(tmp_path: Path, mnist_dir: Path, server: dict, **settings: Any) -> dict[str, str]:
    """job_env with BUCKET/PREFIX (settings may say otherwise) on `server` (moto_on_loopback, s3rver_on_loopback)."""
    env = job_env(tmp_path, mnist_dir, **{"S3_BUCKET": BUCKET, "S3_PREFIX": PREFIX, **settings})
    env.update(server["env"])
    return env


def objects(client: Any, run_id: str, prefix: str = PREFIX) -> dict[str, dict]:
    """A run's objects in BUCKET: relative key -> the listing's entry."""
    root = f"{prefix}/runs/{run_id}/"
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=root).get("Contents", [])
    return {item["Key"][len(root) :]: item for item in listing}


def python(
    *argv: str,
    env: dict[str, str],
    timeout: float = 300,
    cwd: Path = REPO,
    limit_file_bytes: int | None = None,
    umask: int | None = None,
) -> subprocess.CompletedProcess:
    """`python <argv>` to its end, output captured; optionally under a umask, or with `limit_file_bytes` (files
    larger than that cannot be written: EFBIG, what a full disk looks like to the process)."""

    def limits() -> None:
        if umask is not None:
            os.umask(umask)
        if limit_file_bytes:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run(
        [sys.executable, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        preexec_fn=limits if limit_file_bytes or umask is not None else None,
    )


def run_job(env: dict[str, str], *args: str, **options: Any) -> subprocess.CompletedProcess:
    """`python -m job <args>` (the job, or `collect ...`) to its end; options as for `python`."""
    return python("-m", "job", *args, env=env, **options)


def events(text: str) -> list[dict]:
    """The JSON lines of the job's stdout (fails on a line that is not JSON)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- training phases in this process (torch is imported when one is used) ------------------------------------


def small_settings(**overrides: Any) -> Settings:
    """Settings of a phase trained in a few seconds on the CPU: 4 baseline and 6 VAT updates, a checkpoint every 2."""
    from job.settings import load_settings

    values = dict(baseline_steps=4, train_steps=6, unlabeled_batch_size=32, checkpoint_every=2, log_every_s=1000)
    values.update(overrides)
    return load_settings(env_file=None, **values)


def stop_after(n: int) -> Any:
    """A stop flag that behaves as if SIGTERM arrived during update number `n` (train_phase's `stop`)."""
    from job.stop import StopFlag

    class StopAfter(StopFlag):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def is_set(self) -> bool:
            self.calls += 1
            return self.calls >= n

    return StopAfter()


def run_phase(phase: str, settings: Settings, split: Any, folder: Path, stop: Any = None) -> Any:
    """train_phase on the CPU, logging to the job's logger, resuming from what `folder` holds."""
    import torch

    from job.logs import get_logger
    from job.train import Hooks, StopFlag, train_phase

    return train_phase(phase, settings, split, torch.device("cpu"), folder, stop or StopFlag(), Hooks(log=get_logger()))


class RecordingLog:
    """A stand-in for the job's structlog logger that keeps every (event, fields) it is given, for tests that
    check what the code reports."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.records.append((event, fields))

    warning = info

    def events(self) -> list[str]:
        return [event for event, _ in self.records]


def weights(model: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


PIPE_BYTES = 4096  # the smallest pipe Linux makes: one page
SHORTEST_PROGRESS_LINE = 180  # bytes; every progress line read is checked against it
AT_MOST_UPDATES_AHEAD = PIPE_BYTES // SHORTEST_PROGRESS_LINE + 2  # see RunningJob
TRAIN_STEPS_PAST_A_SIGNAL = str(AT_MOST_UPDATES_AHEAD + 8)  # a VAT phase that a signal sent at its first line beats
# The settings of the SIGTERM tests and of the learning run (conftest's learned_run): the article's width (job_env),
# a VAT phase longer than a signal can be late, and enough updates to learn: a few dozen.
LEARNING_STEPS = {
    "BASELINE_STEPS": "30",
    "TRAIN_STEPS": TRAIN_STEPS_PAST_A_SIGNAL,
    "CHECKPOINT_EVERY": "1000",
    "UNLABELED_BATCH_SIZE": "64",
}


def same_models(run_a: Path, run_b: Path) -> bool:
    """Both runs shipped bit-identical models (every weight and BatchNorm statistic of baseline and VAT)."""
    import torch

    from job.checkpoint import load_checkpoint

    for phase in ("baseline", "vat"):
        a, b = (load_checkpoint(run / phase / "model.pt")["model"] for run in (run_a, run_b))
        if a.keys() != b.keys() or not all(torch.equal(a[name], b[name]) for name in a):
            return False
    return True


class RunningJob:
    """`python -m job` in the background, for tests that act on what it says (a signal after a log line).

    Its stdout is a one-page pipe that the test reads a byte at a time, and the job logs one progress line per
    update (VAT_LOG_EVERY_S is set tiny): once PIPE_BYTES are unread, the job blocks on its next line. So while the
    test holds a line, the job is at most AT_MOST_UPDATES_AHEAD updates past it; a signal sent then lands during
    training when the phase has more updates left than that, whatever the machine's speed. The test waits on the
    line (an event), never on a budget of updates being "long enough". `limit_s` bounds the whole run (killed)."""

    def __init__(self, env: dict[str, str], *args: str, limit_s: float = 300) -> None:
        read, write = os.pipe()
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        env = {**env, "VAT_LOG_EVERY_S": "0.000001"}
        self.process = subprocess.Popen([sys.executable, "-m", "job", *args], env=env, stdout=write, cwd=REPO)
        os.close(write)
        self._stdout = read
        self._timer = threading.Timer(limit_s, self.process.kill)
        self._timer.start()
        self.signalled_at: float | None = None

    def line(self) -> dict | None:
        """The next line of stdout as JSON (None at its end), read without reading ahead."""
        data = bytearray()
        while not data.endswith(b"\n"):
            byte = os.read(self._stdout, 1)
            if not byte:
                return None
            data += byte
        record = json.loads(data)
        if record.get("event") == "progress":
            assert len(data) >= SHORTEST_PROGRESS_LINE, f"a progress line shorter than the bound: {data!r}"
        return record

    def until(self, predicate: Callable[[dict], bool]) -> dict:
        """Read lines until `predicate(record)` holds; return that record."""
        while (record := self.line()) is not None:
            if predicate(record):
                return record
        raise AssertionError(f"the job ended (exit {self.process.wait()}) before the expected line")

    def send(self, signum: int = signal.SIGTERM) -> None:
        self.signalled_at = time.monotonic()
        self.process.send_signal(signum)

    def took(self) -> float:
        """Seconds from the signal to now (after `finish`: to the exit)."""
        assert self.signalled_at is not None, "no signal sent"
        return time.monotonic() - self.signalled_at

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        """(exit code, the rest of stdout), reading to the end."""
        rest = bytearray()
        while chunk := os.read(self._stdout, 65536):
            rest += chunk
        return self.process.wait(timeout=timeout), rest.decode()

    def close(self) -> None:
        self._timer.cancel()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            os.close(self._stdout)

    def __enter__(self) -> RunningJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sigterm_during_vat(env: dict[str, str]) -> tuple[int, str, float]:
    """Start the job, send SIGTERM at its first VAT progress line; return (exit code, the rest of stdout, seconds
    from the signal to the exit). The VAT phase must have more than AT_MOST_UPDATES_AHEAD + 1 updates."""
    assert int(env["VAT_TRAIN_STEPS"]) > AT_MOST_UPDATES_AHEAD + 1
    with RunningJob(env) as job:
        job.until(lambda r: r["event"] == "progress" and r["phase"] == "vat")
        job.send(signal.SIGTERM)
        code, rest = job.finish(timeout=60)
        return code, rest, job.took()


# --- waiting on a condition no event announces ---------------------------------------------------------------


def wait_until(condition: Callable[[], Any], limit_s: float, what: str, every_s: float = 0.1) -> Any:
    """Poll `condition` until it returns a true value, which is returned (an exception counts as "not yet"); fail
    after `limit_s`. For what no event announces: a server's port opening, a lease's age on the server's clock."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            result = condition()
            if result:
                return result
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {limit_s} s")
        time.sleep(every_s)


# --- servers on 127.0.0.1 ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{free_port()}/"


def s3_client(endpoint: str, key: str, secret: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret, region_name="us-east-1"
    )


def s3_credentials(endpoint: str, key: str, secret: str) -> dict[str, str]:
    """The AWS_* variables a job needs to reach `endpoint`."""
    return {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }


@contextlib.contextmanager
def moto_on_loopback(bucket: str | None, authenticated: bool = False) -> Iterator[dict]:
    """moto's S3 server on 127.0.0.1 (a free port) holding one empty bucket: its endpoint, the AWS_* variables a
    job needs to reach it, a boto3 client, and `stop` (the server goes away; a test may call it early).
    `authenticated`: a separate process that checks credentials (moto reads that switch once, at import), with
    no bucket and no valid key: every request is refused with 403."""
    if authenticated:
        assert bucket is None, "no key is valid on it: nothing can create a bucket"
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def stop() -> None:
            process.terminate()
            process.wait(timeout=10)

        wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 60, "moto")
    else:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        port = server._server.server_port
        stopped = []

        def stop() -> None:
            if not stopped:
                stopped.append(True)
                server.stop()

    endpoint = f"http://127.0.0.1:{port}"
    client = s3_client(endpoint, "testing", "testing-secret")
    try:
        if bucket:
            client.create_bucket(Bucket=bucket)
        yield {
            "endpoint": endpoint,
            "env": s3_credentials(endpoint, "testing", "testing-secret"),
            "client": client,
            "stop": stop,
        }
    finally:
        stop()


S3RVER = REPO / ".ci" / "s3rver" / "node_modules" / ".bin" / "s3rver"


@contextlib.contextmanager
def s3rver_on_loopback(bucket: str) -> Iterator[dict]:
    """s3rver (a second S3 implementation, in Node.js; it ignores conditional writes) on 127.0.0.1 with one bucket.
    Installed by .ci/run (`npm ci --prefix .ci/s3rver`)."""
    if not S3RVER.exists() or not shutil.which("node"):
        unavailable(f"s3rver not installed ({S3RVER}): npm ci --prefix .ci/s3rver")
    port, folder = free_port(), tempfile.mkdtemp(prefix="s3rver-")
    options = ["--directory", folder, "--address", "127.0.0.1", "--port", str(port), "--silent"]
    process = subprocess.Popen(
        [str(S3RVER), *options, "--configure-bucket", bucket], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    client = s3_client(endpoint, "S3RVER", "S3RVER")  # s3rver's fixed key pair; it checks signatures
    try:
        wait_until(lambda: process.poll() is None and client.head_bucket(Bucket=bucket), 30, "s3rver")
        yield {"endpoint": endpoint, "env": s3_credentials(endpoint, "S3RVER", "S3RVER"), "client": client}
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def sha256_hex(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def put(client: Any, key: str, body: bytes, sha256: str | None = None) -> None:
    """An object in BUCKET as a hostile or careless writer leaves it (with the job's sha256 metadata when given)."""
    client.put_object(Bucket=BUCKET, Key=key, Body=body, **({"Metadata": {"sha256": sha256}} if sha256 else {}))


def files_outside(root: Path, inside: Path) -> list[Path]:
    """Files under `root` that are not under `inside`."""
    return [p for p in root.rglob("*") if p.is_file() and not p.is_relative_to(inside)]


class Mirror:
    """An HTTP server on 127.0.0.1 serving `files` (name -> bytes) at /<name>, counting requests; optionally behind
    basic auth, or hung: it reads each request and never answers (`asked` is set once a request has arrived)."""

    def __init__(
        self, files: dict[str, bytes], user: str | None = None, password: str | None = None, hang: bool = False
    ) -> None:
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() if user else None
        self.requests: list[str] = []
        self.asked, self.released = threading.Event(), threading.Event()
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                mirror.requests.append(self.path)
                mirror.asked.set()
                if hang:
                    mirror.released.wait(120)  # bounded: the test closes the mirror long before
                    self.close_connection = True
                    return
                if expected and self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = files.get(self.path.rsplit("/", 1)[-1])
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
