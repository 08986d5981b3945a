"""The image as users run it, with a real Docker engine: the README's commands, read-only root, docker stop and
resume, uploads to an S3 server on the host network, `vat-job collect`, and the errors a user can cause.

Marked `container`; skipped when no engine answers or the image is not built (`docker build -t vat-job .`), and
failed instead under CI=true (CI: `.ci/run` installs the engine and builds the image with `.ci/container-setup`).
VAT_TEST_IMAGE names another tag. The host folders are created by the tests as "a workstation user" (UID 1000
when the tests run as root, as in CI, and the docker client is run as that user too), so that what the README
promises about the files' owner is checked as a user meets it, not as root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import REPO, events, moto_on_loopback, not_applicable, unavailable

pytestmark = pytest.mark.container

IMAGE = os.environ.get("VAT_TEST_IMAGE", "vat-job")
USER_ID = os.getuid() if os.getuid() != 0 else 1000  # "the user who ran it"
SHORT = {  # a few updates on the CPU: seconds, not minutes
    "VAT_BASELINE_STEPS": "4",
    "VAT_TRAIN_STEPS": "4",
    "VAT_UNLABELED_BATCH_SIZE": "64",
    "VAT_EVAL_BATCH_SIZE": "5000",
    "VAT_CHECKPOINT_EVERY": "1000",
}


@pytest.fixture(scope="module")
def docker() -> str:
    client = shutil.which("docker")
    if client is None:
        unavailable("no docker client")
    if subprocess.run([client, "info"], capture_output=True, timeout=60).returncode != 0:
        unavailable("no Docker engine answers")
    if subprocess.run([client, "image", "inspect", IMAGE], capture_output=True, timeout=60).returncode != 0:
        unavailable(f"image {IMAGE!r} is not built (docker build -t {IMAGE} .)")
    return client


@pytest.fixture(scope="module")
def mnist(mnist_dir) -> Path:
    return mnist_dir


@pytest.fixture
def workdir():
    """A folder of the workstation user's (under /var/tmp: pytest's own tmp folder is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="vat-container-", dir="/var/tmp"))
    os.chown(path, USER_ID, USER_ID)
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def users_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, USER_ID, USER_ID)
    return path


def as_user() -> list[str]:
    """Run a host command as the workstation user (with the docker group, as a Docker user has it)."""
    if os.getuid() != 0:
        return []
    socket_gid = os.stat("/var/run/docker.sock").st_gid
    return ["setpriv", f"--reuid={USER_ID}", f"--regid={USER_ID}", f"--groups={socket_gid}", "--"]


def has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi], capture_output=True).returncode == 0


def run(docker: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([docker, "run", "--rm", *args], capture_output=True, text=True, timeout=timeout)


def env_args(env: dict[str, str]) -> list[str]:
    return [item for name, value in env.items() for item in ("-e", f"{name}={value}")]


def readme_container_block() -> list[str]:
    """The README's container commands, continuation lines joined, comments dropped."""
    section = (REPO / "README.md").read_text().split("\n## Container\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command:
            commands.append(re.sub(r"\s+", " ", command))
    return commands


def set_env_file(path: Path, values: dict[str, str]) -> None:
    """Set variables in a copy of .env.example the way a user edits it: uncomment or change the line."""
    lines = path.read_text().splitlines()
    for name, value in values.items():
        matches = [i for i, line in enumerate(lines) if re.match(rf"^#?\s*{name}=", line)]
        if matches:
            lines[matches[0]] = f"{name}={value}"
        else:
            lines.append(f"{name}={value}")
    path.write_text("\n".join(lines) + "\n")


def test_env_example_leaves_the_image_paths_alone():
    """`docker run --env-file .env` (a copy of .env.example) must not override what the image's ENV sets."""
    image_env = set(re.findall(r"\b(VAT_[A-Z0-9_]+)=", (REPO / "Dockerfile").read_text()))
    assert {"VAT_DATA_DIR", "VAT_OUTPUT_DIR"} <= image_env
    example = (REPO / ".env.example").read_text()
    assert not {name for name in image_env if re.search(rf"^{name}=", example, flags=re.MULTILINE)}


def test_readme_commands_run_as_written_on_cpu(docker, mnist, workdir):
    commands = readme_container_block()
    assert commands[0] == "docker build -t vat-job ."  # built by .ci/container-setup (same Dockerfile)
    runs = [c for c in commands if c.startswith("docker run")]
    setup = [c for c in commands if not c.startswith("docker ")]
    assert runs and setup, commands
    readme_run = runs[0]
    assert "--gpus all" in readme_run and "$PWD/runs:/output" in readme_run and "--env-file .env" in readme_run
    if not has_gpu():  # the README: without a GPU, leave out --gpus all
        readme_run = readme_run.replace(" --gpus all", "")
    readme_run = re.sub(r" vat-job$", f" {IMAGE}", readme_run)

    for command in setup:  # mkdir -p data runs, cp .env.example .env: in the user's folder, as the user
        shutil.copy(REPO / ".env.example", workdir / ".env.example")
        subprocess.run([*as_user(), "bash", "-c", command], cwd=workdir, check=True, timeout=60)
    assert (workdir / "runs").stat().st_uid == USER_ID and (workdir / ".env").is_file()
    raw = workdir / "data" / "MNIST" / "raw"
    shutil.copytree(mnist / "MNIST" / "raw", raw)
    for path in [raw.parent, raw, *raw.iterdir()]:
        os.chown(path, USER_ID, USER_ID)
    set_env_file(workdir / ".env", {**SHORT, "VAT_RUN_ID": "readme", "VAT_PLOTS": "true"})

    began = time.monotonic()
    result = subprocess.run(
        [*as_user(), "bash", "-c", readme_run], cwd=workdir, capture_output=True, text=True, timeout=600
    )
    seconds = time.monotonic() - began
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(
        f"README docker run, {SHORT['VAT_BASELINE_STEPS']}+{SHORT['VAT_TRAIN_STEPS']} updates on CPU: {seconds:.1f} s"
    )
    records = events(result.stdout)
    assert [r["event"] for r in records[-2:]] == ["run_finished", "summary"] and records[-1]["run_id"] == "readme", (
        seconds
    )
    folder = workdir / "runs" / "readme"
    report = json.loads((folder / "report.json").read_text())
    assert report["settings"]["data_dir"] == "/data" and report["settings"]["output_dir"] == "/output"
    for path in ("report.json", "log.jsonl", "vat/model.pt", "baseline/model.pt", "plots/losses.png"):
        assert (folder / path).stat().st_uid == USER_ID, path  # the user's own files, not root's or 10001's
    assert (folder / "plots/losses.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def s3_on_loopback():
    with moto_on_loopback("vat-container") as server:
        settings = {"VAT_S3_BUCKET": "vat-container", "VAT_S3_PREFIX": "ci"}
        yield {"env": {**server["env"], **settings}, "client": server["client"]}


def keys(client, run_id: str) -> set[str]:
    listing = client.list_objects_v2(Bucket="vat-container", Prefix=f"ci/runs/{run_id}/").get("Contents", [])
    return {item["Key"].removeprefix(f"ci/runs/{run_id}/") for item in listing}


def locked_down(output: Path, mnist: Path) -> list[str]:
    """As on Kubernetes: read-only root, no capabilities, MNIST read-only, the user's UID, host network (S3)."""
    return [
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--network",
        "host",
        "--user",
        f"{USER_ID}:{USER_ID}",
        "-v",
        f"{mnist}:/data:ro",
        "-v",
        f"{output}:/output",
    ]


def test_read_only_root_docker_stop_resume_on_another_node_upload_and_collect(docker, mnist, workdir, s3_on_loopback):
    s3, client = s3_on_loopback["env"], s3_on_loopback["client"]
    env = {
        **s3,
        **SHORT,
        "VAT_RUN_ID": "stopped",
        "VAT_DEVICE": "cpu",
        "VAT_TRAIN_STEPS": "20",
        "VAT_LOG_EVERY_S": "0.01",
        "VAT_PLOTS": "false",
    }
    name = f"vat-stop-{os.getpid()}"
    first = users_folder(workdir / "node-a")
    process = subprocess.Popen(
        [docker, "run", "--rm", "--name", name, *locked_down(first, mnist), *env_args(env), IMAGE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stdout:
            record = json.loads(line)
            if record["event"] == "progress" and record.get("phase") == "vat":
                break
        sent = time.monotonic()
        subprocess.run([docker, "stop", "--time", "30", name], capture_output=True, timeout=60)
        rest = process.stdout.read()
        code = process.wait(timeout=60)
        stop_seconds = time.monotonic() - sent
    finally:
        if process.poll() is None:
            subprocess.run([docker, "kill", name], capture_output=True)
            process.wait()
    assert code == 5, rest[-2000:] + process.stderr.read()[-2000:]
    print(f"docker stop -> exit 5 after {stop_seconds:.2f} s")
    assert stop_seconds < 15, stop_seconds  # SIGTERM, not SIGKILL after the 30 s grace period
    interrupted = events(rest)[-1]
    assert interrupted["event"] == "interrupted" and interrupted["signal"] == "SIGTERM"
    stopped_at = interrupted["step"]
    assert 0 < stopped_at < 20
    assert f"vat/checkpoint-{stopped_at:07d}.pt" in keys(client, "stopped")
    assert "manifest.json" not in keys(client, "stopped")

    # Another node: an empty output folder, the same run id; the checkpoints come from the bucket.
    second = users_folder(workdir / "node-b")
    began = time.monotonic()
    resumed = run(docker, *locked_down(second, mnist), *env_args(env), IMAGE)
    print(f"resumed run (read-only root, S3 on loopback): {time.monotonic() - began:.1f} s")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    report = json.loads((second / "stopped" / "report.json").read_text())
    assert report["models"]["vat"]["resumed_from_step"] == stopped_at and report["models"]["vat"]["steps"] == 20
    assert report["models"]["baseline"]["resumed_from_step"] == 4  # finished before the stop: not trained again
    assert {"manifest.json", "report.json", "vat/model.pt"} <= keys(client, "stopped")

    # Results without torch on the laptop: `vat-job collect` from the image.
    collect_env = env_args({k: v for k, v in s3.items()})
    began = time.monotonic()
    collected = run(
        docker,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        *collect_env,
        IMAGE,
        "collect",
        "--format",
        "json",
        timeout=120,
    )
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    print(f"vat-job collect from the image: {time.monotonic() - began:.1f} s")
    (row,) = [row for row in json.loads(collected.stdout)["runs"] if row["run_id"] == "stopped"]
    assert row["status"] == "complete" and 0 <= row["vat.mnist_test.accuracy"] <= 1
    downloads = users_folder(workdir / "results")
    fetched = run(
        docker,
        "--network",
        "host",
        "--user",
        f"{USER_ID}:{USER_ID}",
        "-v",
        f"{downloads}:/output",
        *collect_env,
        IMAGE,
        "collect",
        "--run",
        "stopped",
        "--download",
        "/output",
        timeout=120,
    )
    assert fetched.returncode == 0, fetched.stdout[-2000:] + fetched.stderr[-2000:]
    assert (downloads / "stopped" / "report.json").stat().st_uid == USER_ID


def one_error_line(result: subprocess.CompletedProcess, code: int, event: str) -> dict:
    """The error a user caused: the documented exit code, one line that says what to do, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-3000:]
    assert "Traceback" not in output and result.stderr == "", output[-3000:]
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["event"] == event and last["exit_code"] == code
    return last


def test_output_folder_docker_created_as_root_is_one_line_and_exit_2(docker, mnist, workdir):
    output = workdir / "runs"
    output.mkdir()  # what `docker run -v "$PWD/runs:/output"` leaves when runs/ did not exist: root's, 755
    os.chown(output, 0, 0)
    for log_format in ("json", "console"):
        result = run(
            docker,
            "-e",
            f"VAT_LOG_FORMAT={log_format}",
            "-v",
            f"{mnist}:/data:ro",
            "-v",
            f"{output}:/output",
            IMAGE,
            timeout=120,
        )
        assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, result.stdout
        assert len(result.stdout.strip().splitlines()) == 1, result.stdout
        line = json.loads(result.stdout)["message"] if log_format == "json" else result.stdout
        assert "VAT_OUTPUT_DIR=/output is not writable by this process (uid 10001" in line
        assert '--user "$(id -u):$(id -g)"' in line
    assert list(output.iterdir()) == []


def test_other_errors_a_user_can_cause_are_one_line_each(docker, mnist, workdir):
    output = users_folder(workdir / "runs")
    user = ["--user", f"{USER_ID}:{USER_ID}", "-v", f"{output}:/output"]

    bad = run(docker, *user, "-e", "VAT_EPSILON=-1", IMAGE, timeout=120)
    assert "VAT_EPSILON" in one_error_line(bad, 2, "config_error")["message"]
    typo = run(docker, *user, "-e", "VAT_EPSILLON=2", IMAGE, timeout=120)
    assert "VAT_EPSILLON" in one_error_line(typo, 2, "config_error")["message"]

    empty = workdir / "data"
    empty.mkdir()  # a data folder Docker made (root's, empty): MNIST is not there and cannot be downloaded into it
    os.chown(empty, 0, 0)
    missing = run(docker, *user, "-v", f"{empty}:/data", IMAGE, timeout=300)
    message = one_error_line(missing, 3, "data_error")["message"]
    assert "/data/MNIST/raw" in message and "cannot be written" in message

    offline = run(
        docker,
        *user,
        "-e",
        'VAT_MNIST_MIRRORS=["http://127.0.0.1:9/"]',
        "-e",
        "VAT_DOWNLOAD_RETRIES=1",
        IMAGE,
        timeout=300,
    )
    assert "could not download" in one_error_line(offline, 3, "data_error")["message"]

    if not has_gpu():
        cuda = run(docker, *user, "-v", f"{mnist}:/data:ro", "-e", "VAT_DEVICE=cuda", IMAGE, timeout=300)
        assert "no CUDA device is visible" in one_error_line(cuda, 10, "no_gpu_visible")["message"]


def test_gpu_run_of_the_image(docker, mnist, workdir):
    if not has_gpu():
        not_applicable("no GPU (nvidia-smi)")
    output = users_folder(workdir / "runs")
    env = {**SHORT, "VAT_RUN_ID": "gpu", "VAT_DEVICE": "cuda", "VAT_PLOTS": "false"}
    result = run(
        docker,
        "--gpus",
        "all",
        "--user",
        f"{USER_ID}:{USER_ID}",
        "-v",
        f"{mnist}:/data:ro",
        "-v",
        f"{output}:/output",
        *env_args(env),
        IMAGE,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((output / "gpu" / "report.json").read_text())
    assert report["environment"]["device"] == "cuda"
