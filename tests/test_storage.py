"""Object storage against a real S3-compatible HTTP server (moto) on 127.0.0.1, through the job's own boto3 path."""

import hashlib
import json
import os

import pytest

from tests.support import (
    BUCKET,
    DEFAULT_WIDTH,
    LEARNING_STEPS,
    RunningJob,
    events,
    free_port,
    moto_on_loopback,
    objects,
    run_job,
    s3_job_env,
    same_models,
    sigterm_during_vat,
)


@pytest.fixture(scope="module")
def uploaded_run(tmp_path_factory, mnist_dir, s3_server):
    tmp = tmp_path_factory.mktemp("s3run")
    env = s3_job_env(tmp, mnist_dir, s3_server, RUN_ID="up-1", PLOTS="true", **DEFAULT_WIDTH)
    result = run_job(env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp, env, result


@pytest.mark.slow
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


@pytest.mark.slow
def test_checkpoints_are_uploaded_as_training_goes(uploaded_run):
    _, _, result = uploaded_run
    seen = events(result.stdout)
    names = [e["event"] for e in seen]
    during_training = [e["file"] for e in seen[: names.index("evaluated")] if e["event"] == "checkpoint_uploaded"]
    assert "baseline/checkpoint-0000002.pt" in during_training and "vat/checkpoint-0000002.pt" in during_training
    assert "checkpoint_upload_failed" not in names
    final_uploads = [e["file"] for e in seen if e["event"] == "uploaded"]
    assert final_uploads and not [f for f in final_uploads if "checkpoint" in f], "not uploaded twice"


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_on_another_node_from_the_bucket_alone(uploaded_run, tmp_path):
    tmp, env, first = uploaded_run
    report_before = json.loads((tmp / "runs/up-1/report.json").read_text())
    again = run_job({**env, "VAT_OUTPUT_DIR": str(tmp_path / "other-node")})  # an empty run folder
    assert again.returncode == 0, again.stdout[-3000:]
    seen = events(again.stdout)
    assert [e["phase"] for e in seen if e["event"] == "resumed"] == ["baseline", "vat"]
    assert not [e for e in seen if e["event"] == "training_started"], "nothing was trained again"
    report_after = json.loads((tmp_path / "other-node/up-1/report.json").read_text())
    assert report_after["models"]["vat"]["mnist_test"] == report_before["models"]["vat"]["mnist_test"]


@pytest.mark.slow
def test_server_down_fails_fast_with_exit_4_before_training(tmp_path, mnist_dir, s3_server):
    env = s3_job_env(tmp_path, mnist_dir, s3_server, RUN_ID="down", S3_MAX_ATTEMPTS="2", S3_CONNECT_TIMEOUT_S="1")
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    result = run_job(env)
    assert result.returncode == 4
    last = events(result.stdout)[-1]
    assert last["event"] == "storage_error" and "unreachable" in last["message"]
    assert not [e for e in events(result.stdout) if e["event"] == "training_started"]


@pytest.mark.slow
def test_missing_bucket_is_exit_4_with_a_clear_message(tmp_path, mnist_dir, s3_server):
    env = s3_job_env(tmp_path, mnist_dir, s3_server, RUN_ID="nobucket", S3_BUCKET="no-such-bucket")
    result = run_job(env)
    assert result.returncode == 4
    assert "bucket 'no-such-bucket' does not exist" in events(result.stdout)[-1]["message"]


@pytest.mark.slow
def test_wrong_credentials_are_exit_4_access_denied(tmp_path, mnist_dir):
    with moto_on_loopback(None, authenticated=True) as checking:
        env = s3_job_env(tmp_path, mnist_dir, checking, RUN_ID="badkeys")
        env.update(AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG0", AWS_SECRET_ACCESS_KEY="wrong")
        result = run_job(env)
    assert result.returncode == 4
    message = events(result.stdout)[-1]["message"]
    assert "access to bucket 'vat-results' denied" in message and "check the credentials" in message


@pytest.mark.slow
def test_upload_failure_after_training_keeps_local_artifacts_and_a_rerun_uploads_without_retraining(
    tmp_path, mnist_dir, s3_server
):
    with moto_on_loopback(BUCKET) as flaky:
        settings = dict(RUN_ID="flaky", S3_MAX_ATTEMPTS="2", S3_CONNECT_TIMEOUT_S="1", UNLABELED_BATCH_SIZE="64")
        env = s3_job_env(tmp_path, mnist_dir, flaky, TRAIN_STEPS="10", **settings)
        with RunningJob(env) as job:
            job.until(lambda r: r["event"] == "training_started")
            flaky["stop"]()  # the storage goes away mid-run
            code, rest = job.finish(timeout=120)
    assert code == 4
    assert events(rest)[-1]["event"] == "storage_error"
    local = tmp_path / "runs" / "flaky"
    assert (local / "report.json").is_file() and (local / "vat" / "model.pt").is_file()

    # The job could not delete its bucket lease with the storage gone, and moto's servers share one backend, so the
    # lease is here too: a rerun would wait out its 120 s (the takeover of an expired lease is test_untrusted_bucket's).
    s3_server["client"].delete_object(Bucket=BUCKET, Key="team/vat/locks/flaky.json")
    env.update(s3_server["env"])
    again = run_job(env)
    assert again.returncode == 0, again.stdout[-2000:]
    assert not [e for e in events(again.stdout) if e["event"] == "training_started"]
    assert "manifest.json" in objects(s3_server["client"], "flaky")


@pytest.mark.slow
def test_sigterm_uploads_the_checkpoint_and_a_resume_from_the_bucket_matches(tmp_path, mnist_dir, s3_server, request):
    env = s3_job_env(tmp_path, mnist_dir, s3_server, RUN_ID="preempted", **LEARNING_STEPS)
    code, rest, _ = sigterm_during_vat(env)
    assert code == 5
    assert "checkpoint_upload_failed" not in rest
    stored = objects(s3_server["client"], "preempted")
    assert [name for name in stored if name.startswith("vat/checkpoint-")], "the SIGTERM checkpoint is in the bucket"
    assert "manifest.json" not in stored, "an interrupted run has no manifest"
    assert "log.jsonl" in stored, "the interrupted attempt's log goes with its checkpoint"
    resumed = run_job({**env, "VAT_OUTPUT_DIR": str(tmp_path / "other-node")})  # the node is gone: the bucket alone
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    attempts = (tmp_path / "other-node/preempted/log.jsonl").read_text().count('"event": "run_started"')
    assert attempts == 2, "the resumed run's log.jsonl keeps the first attempt's lines"
    # The uninterrupted reference only now: while another worker makes it, this one has trained instead of waiting.
    assert same_models(request.getfixturevalue("learned_run"), tmp_path / "other-node/preempted")


@pytest.mark.slow
def test_collect_lists_runs_with_status_metrics_and_seed_statistics(tmp_path, mnist_dir, s3_server, uploaded_run):
    env = s3_job_env(tmp_path, mnist_dir, s3_server, S3_PREFIX="sweep", BASELINE_STEPS="2", TRAIN_STEPS="2")
    for seed in (1, 2):
        assert run_job({**env, "VAT_RUN_ID": f"seed-{seed}", "VAT_LABEL_SPLIT_SEED": str(seed)}).returncode == 0
    s3_server["client"].put_object(Bucket=BUCKET, Key="sweep/runs/broken/vat/checkpoint-0000002.pt", Body=b"x")

    as_json = run_job(env, "collect", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    status = {row["run_id"]: row["status"] for row in data["runs"]}
    assert status == {"seed-1": "complete", "seed-2": "complete", "broken": "incomplete"}
    group = next(g for g in data["configurations"] if g["runs"] == 2)
    assert group["label_split_seeds"] == [1, 2]
    values = [r["vat.mnist_test.accuracy"] for r in data["runs"] if r["run_id"].startswith("seed")]
    assert group["vat.mnist_test.accuracy"]["mean"] == pytest.approx(sum(values) / 2)

    table = run_job(env, "collect")
    assert table.returncode == 0 and "seed-1" in table.stdout and "mean ± std" in table.stdout
    assert "label_split_seed" in table.stdout.splitlines()[0], "settings that differ are columns"
    csv_out = run_job(env, "collect", "--format", "csv")
    assert csv_out.stdout.splitlines()[0].startswith("run_id,created_at,status")

    fetched = run_job(env, "collect", "--run", "seed-1", "--download", str(tmp_path / "dl"))
    assert fetched.returncode == 0
    assert (tmp_path / "dl" / "seed-1" / "report.json").is_file()
    assert (tmp_path / "dl" / "seed-1" / "manifest.json").is_file()


def test_large_files_go_multipart_and_arrive_intact(tmp_path, aws_env):
    from job.storage import MULTIPART_THRESHOLD, RunStore, make_client

    s3_server = aws_env
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(MULTIPART_THRESHOLD + 1234567))
    store = RunStore(make_client(), BUCKET, "team/vat", "multipart")
    store.upload(big, "vat/big.bin")
    head = s3_server["client"].head_object(Bucket=BUCKET, Key="team/vat/runs/multipart/vat/big.bin")
    assert "-" in head["ETag"], "a multipart upload's ETag ends in -<parts>"
    body = s3_server["client"].get_object(Bucket=BUCKET, Key="team/vat/runs/multipart/vat/big.bin")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(big.read_bytes()).hexdigest()
