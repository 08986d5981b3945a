"""Object storage against a real S3-compatible HTTP server (moto) on 127.0.0.1, through the job's own boto3 path."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import boto3
import pytest

from tests.conftest import DEFAULT_WIDTH, REPO, job_env, moto_on_loopback, sigterm_during_vat

BUCKET = "vat-results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    with moto_on_loopback(BUCKET) as server:
        yield server


def env_for(tmp_path, mnist_dir, s3, **settings):
    env = job_env(tmp_path, mnist_dir, **{"S3_BUCKET": BUCKET, "S3_PREFIX": "team/vat", **settings})
    env.update(s3["env"])
    return env


def run(env, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "job", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def events(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def objects(client, run_id):
    prefix = f"team/vat/runs/{run_id}/"
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {item["Key"][len(prefix) :]: item for item in listing}


@pytest.fixture(scope="module")
def uploaded_run(tmp_path_factory, mnist_dir, s3_server):
    tmp = tmp_path_factory.mktemp("s3run")
    env = env_for(tmp, mnist_dir, s3_server, RUN_ID="up-1", PLOTS="true", **DEFAULT_WIDTH)
    result = run(env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp, env, result


def test_every_artifact_arrives_intact_and_the_manifest_describes_them(uploaded_run, s3_server):
    tmp, _, result = uploaded_run
    client, local = s3_server["client"], tmp / "runs" / "up-1"
    stored = objects(client, "up-1")
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key="team/vat/runs/up-1/manifest.json")["Body"].read())
    assert set(stored) == set(manifest["files"]) | {"manifest.json"}
    for name in (
        "report.json",
        "log.jsonl",
        "baseline/model.pt",
        "vat/model.pt",
        "vat/checkpoint-0000002.pt",
        "plots/losses.png",
    ):
        assert name in manifest["files"], name
    for name, entry in manifest["files"].items():
        body = client.get_object(Bucket=BUCKET, Key=f"team/vat/runs/up-1/{name}")["Body"].read()
        assert len(body) == entry["size"] and hashlib.sha256(body).hexdigest() == entry["sha256"], name
        assert (local / name).read_bytes() == body, name
    assert [e["event"] for e in events(result.stdout)[-2:]] == ["run_uploaded", "summary"]
    assert "testing-secret" not in result.stdout and "testing-secret" not in (local / "log.jsonl").read_text()


def test_checkpoints_are_uploaded_as_training_goes(uploaded_run):
    _, _, result = uploaded_run
    seen = events(result.stdout)
    names = [e["event"] for e in seen]
    during_training = [e["file"] for e in seen[: names.index("evaluated")] if e["event"] == "checkpoint_uploaded"]
    assert "baseline/checkpoint-0000002.pt" in during_training and "vat/checkpoint-0000002.pt" in during_training
    assert "checkpoint_upload_failed" not in names
    final_uploads = [e["file"] for e in seen if e["event"] == "uploaded"]
    assert final_uploads and not [f for f in final_uploads if "checkpoint" in f], "not uploaded twice"


def test_only_the_newest_checkpoints_are_kept_in_the_run_folder_and_in_the_bucket(uploaded_run, s3_server):
    """VAT_KEEP_CHECKPOINTS=2 (the default): the baseline wrote 2, 4 and 6; 2 was uploaded, then deleted."""
    tmp, _, result = uploaded_run
    local, stored = tmp / "runs" / "up-1", objects(s3_server["client"], "up-1")
    for phase, kept in (("baseline", (4, 6)), ("vat", (2, 4))):
        names = {f"{phase}/checkpoint-{step:07d}.pt" for step in kept}
        assert {name for name in stored if name.startswith(f"{phase}/checkpoint-")} == names
        assert {path.relative_to(local).as_posix() for path in local.glob(f"{phase}/checkpoint-*.pt")} == names
    deleted = [e["file"] for e in events(result.stdout) if e["event"] == "checkpoint_deleted"]
    assert deleted == ["baseline/checkpoint-0000002.pt"]


def test_the_bucket_keeps_the_newest_checkpoints_it_holds_and_deletes_only_after_an_intact_upload(tmp_path):
    """A failed upload must not leave the bucket without checkpoints to resume from on another node."""
    from job.layout import RunLayout
    from job.logs import get_logger
    from job.run import upload_as_training_goes
    from job.stop import StopFlag
    from job.storage import StorageError

    class Bucket:
        def __init__(self, names):
            self.objects, self.failing = dict.fromkeys(names, 1), False

        def upload(self, path, relative):
            if self.failing:
                raise StorageError("connection reset")
            self.objects[relative] = path.stat().st_size

        def remote_objects(self):
            return dict(self.objects)

        def delete(self, relative):
            del self.objects[relative]

    class Lock:
        def check(self):
            pass

    def written(step):
        path = tmp_path / "vat" / f"checkpoint-{step:07d}.pt"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
        return path

    def upload(step):
        upload_as_training_goes(bucket, RunLayout(tmp_path), written(step), get_logger(), StopFlag(), Lock(), 2)

    baseline = {f"baseline/checkpoint-{step:07d}.pt" for step in (2, 4, 6)}  # a delete that failed earlier
    bucket = Bucket({*baseline, "vat/checkpoint-0000002.pt", "vat/checkpoint-0000004.pt", "vat/model.pt"})
    bucket.failing = True
    upload(6)  # the run folder now keeps 6 and 4: the bucket still has 4 and 2, and keeps both
    assert set(bucket.objects) == {*baseline, "vat/checkpoint-0000002.pt", "vat/checkpoint-0000004.pt", "vat/model.pt"}
    bucket.failing = False
    upload(8)  # 6 never arrived: the bucket's newest two are 8 and 4
    assert set(bucket.objects) == {
        "baseline/checkpoint-0000004.pt",
        "baseline/checkpoint-0000006.pt",
        "vat/checkpoint-0000004.pt",
        "vat/checkpoint-0000008.pt",
        "vat/model.pt",
    }


def test_resume_from_the_bucket_after_the_local_folder_is_gone(uploaded_run, s3_server):
    tmp, env, first = uploaded_run
    report_before = json.loads((tmp / "runs/up-1/report.json").read_text())
    shutil.rmtree(tmp / "runs")
    again = run(env)
    assert again.returncode == 0, again.stdout[-3000:]
    seen = events(again.stdout)
    assert [e["phase"] for e in seen if e["event"] == "resumed"] == ["baseline", "vat"]
    assert not [e for e in seen if e["event"] == "training_started"], "nothing was trained again"
    report_after = json.loads((tmp / "runs/up-1/report.json").read_text())
    assert report_after["models"]["vat"]["mnist_test"] == report_before["models"]["vat"]["mnist_test"]


def test_server_down_fails_fast_with_exit_4_before_training(tmp_path, mnist_dir, s3_server):
    env = env_for(tmp_path, mnist_dir, s3_server, RUN_ID="down", S3_MAX_ATTEMPTS="2", S3_CONNECT_TIMEOUT_S="1")
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    result = run(env)
    assert result.returncode == 4
    last = events(result.stdout)[-1]
    assert last["event"] == "storage_error" and "unreachable" in last["message"]
    assert not [e for e in events(result.stdout) if e["event"] == "training_started"]


def test_missing_bucket_is_exit_4_with_a_clear_message(tmp_path, mnist_dir, s3_server):
    env = env_for(tmp_path, mnist_dir, s3_server, RUN_ID="nobucket", S3_BUCKET="no-such-bucket")
    result = run(env)
    assert result.returncode == 4
    assert "bucket 'no-such-bucket' does not exist" in events(result.stdout)[-1]["message"]


def test_wrong_credentials_are_exit_4_access_denied(tmp_path, mnist_dir):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        env = job_env(tmp_path, mnist_dir, RUN_ID="badkeys", S3_BUCKET=BUCKET)
        env.update(
            AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG0",
            AWS_SECRET_ACCESS_KEY="wrong",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        )
        result = run(env)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert result.returncode == 4
    message = events(result.stdout)[-1]["message"]
    assert "access to bucket 'vat-results' denied" in message and "check the credentials" in message


def test_upload_failure_after_training_keeps_local_artifacts_and_a_rerun_uploads_without_retraining(
    tmp_path, mnist_dir, s3_server
):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="a", aws_secret_access_key="b", region_name="us-east-1"
    ).create_bucket(Bucket=BUCKET)
    env = env_for(
        tmp_path,
        mnist_dir,
        s3_server,
        RUN_ID="flaky",
        S3_MAX_ATTEMPTS="2",
        S3_CONNECT_TIMEOUT_S="1",
        LOG_EVERY_S="0.01",
        TRAIN_STEPS="10",
        UNLABELED_BATCH_SIZE="64",
    )
    env["AWS_ENDPOINT_URL"] = endpoint
    process = subprocess.Popen([sys.executable, "-m", "job"], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    for line in process.stdout:
        if json.loads(line)["event"] == "training_started":
            server.stop()  # the storage goes away mid-run
            break
    rest = process.stdout.read()
    assert process.wait(timeout=120) == 4
    assert json.loads(rest.strip().splitlines()[-1])["event"] == "storage_error"
    local = tmp_path / "runs" / "flaky"
    assert (local / "report.json").is_file() and (local / "vat" / "model.pt").is_file()

    # The job could not delete its bucket lease with the storage gone, and moto's servers share one backend, so the
    # lease is here too: a rerun would wait out its 120 s (the takeover of an expired lease is test_untrusted_bucket's).
    s3_server["client"].delete_object(Bucket=BUCKET, Key="team/vat/locks/flaky.json")
    env["AWS_ENDPOINT_URL"] = s3_server["endpoint"]
    again = run(env)
    assert again.returncode == 0, again.stdout[-2000:]
    assert not [e for e in events(again.stdout) if e["event"] == "training_started"]
    assert "manifest.json" in objects(s3_server["client"], "flaky")


def test_sigterm_uploads_the_checkpoint_and_a_resume_from_the_bucket_matches(tmp_path, mnist_dir, s3_server):
    steps = dict(BASELINE_STEPS="4", TRAIN_STEPS="16", CHECKPOINT_EVERY="1000", UNLABELED_BATCH_SIZE="64")
    straight = run(job_env(tmp_path / "a", mnist_dir, RUN_ID="straight", **steps))
    assert straight.returncode == 0
    env = env_for(tmp_path / "b", mnist_dir, s3_server, RUN_ID="preempted", LOG_EVERY_S="0.01", **steps)
    code, rest, _ = sigterm_during_vat(env)
    assert code == 5
    assert "checkpoint_upload_failed" not in rest
    stored = objects(s3_server["client"], "preempted")
    assert [name for name in stored if name.startswith("vat/checkpoint-")], "the SIGTERM checkpoint is in the bucket"
    assert "manifest.json" not in stored, "an interrupted run has no manifest"
    assert "log.jsonl" in stored, "the interrupted attempt's log goes with its checkpoint"
    shutil.rmtree(tmp_path / "b" / "runs")  # the node is gone: resume from the bucket alone
    resumed = run(env)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    attempts = (tmp_path / "b/runs/preempted/log.jsonl").read_text().count('"event": "run_started"')
    assert attempts == 2, "the resumed run's log.jsonl keeps the first attempt's lines"
    a = json.loads((tmp_path / "a/runs/straight/report.json").read_text())["models"]
    b = json.loads((tmp_path / "b/runs/preempted/report.json").read_text())["models"]
    assert a["vat"]["mnist_test"]["confusion_matrix"] == b["vat"]["mnist_test"]["confusion_matrix"]


def test_collect_lists_runs_with_status_metrics_and_seed_statistics(tmp_path, mnist_dir, s3_server, uploaded_run):
    env = env_for(tmp_path, mnist_dir, s3_server, S3_PREFIX="sweep", BASELINE_STEPS="2", TRAIN_STEPS="2")
    for seed in (1, 2):
        assert run({**env, "VAT_RUN_ID": f"seed-{seed}", "VAT_LABEL_SPLIT_SEED": str(seed)}).returncode == 0
    s3_server["client"].put_object(Bucket=BUCKET, Key="sweep/runs/broken/vat/checkpoint-0000002.pt", Body=b"x")

    as_json = run(env, "collect", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    status = {row["run_id"]: row["status"] for row in data["runs"]}
    assert status == {"seed-1": "complete", "seed-2": "complete", "broken": "incomplete"}
    group = next(g for g in data["configurations"] if g["runs"] == 2)
    assert group["label_split_seeds"] == [1, 2]
    values = [r["vat.mnist_test.accuracy"] for r in data["runs"] if r["run_id"].startswith("seed")]
    assert group["vat.mnist_test.accuracy"]["mean"] == pytest.approx(sum(values) / 2)

    table = run(env, "collect")
    assert table.returncode == 0 and "seed-1" in table.stdout and "mean ± std" in table.stdout
    assert "label_split_seed" in table.stdout.splitlines()[0], "settings that differ are columns"
    csv_out = run(env, "collect", "--format", "csv")
    assert csv_out.stdout.splitlines()[0].startswith("run_id,created_at,status")

    fetched = run(env, "collect", "--run", "seed-1", "--download", str(tmp_path / "dl"))
    assert fetched.returncode == 0
    assert (tmp_path / "dl" / "seed-1" / "report.json").is_file()
    assert (tmp_path / "dl" / "seed-1" / "manifest.json").is_file()


def test_large_files_go_multipart_and_arrive_intact(tmp_path, s3_server, monkeypatch):
    from job.storage import MULTIPART_THRESHOLD, RunStore, make_client

    for name, value in s3_server["env"].items():
        monkeypatch.setenv(name, value)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(MULTIPART_THRESHOLD + 1234567))
    store = RunStore(make_client(), BUCKET, "team/vat", "multipart")
    store.upload(big, "vat/big.bin")
    head = s3_server["client"].head_object(Bucket=BUCKET, Key="team/vat/runs/multipart/vat/big.bin")
    assert "-" in head["ETag"], "a multipart upload's ETag ends in -<parts>"
    body = s3_server["client"].get_object(Bucket=BUCKET, Key="team/vat/runs/multipart/vat/big.bin")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(big.read_bytes()).hexdigest()
