"""Issue 11: a hostile bucket, a flaky or hung server, a second copy of the job, a full disk. Every server is real
and on 127.0.0.1: moto's, and tests/faultproxy.py in front of it where a row needs a failing or hung one."""

import hashlib
import json
import os
import signal

import pytest

from job.lock import RunLock, RunLocked
from job.storage import RunStore, StorageError, make_client
from tests.faultproxy import FaultProxy
from tests.support import (
    BUCKET,
    PREFIX,
    TRAIN_STEPS_PAST_A_SIGNAL,
    Mirror,
    RunningJob,
    events,
    files_outside,
    job_env,
    objects,
    put,
    run_job,
    s3_job_env,
    sha256_hex,
    wait_until,
)


def named(root, names):
    return [p for p in root.rglob("*") if p.name in names]


# --- row 1 and 2: keys decide no path outside the folder; folder markers are not files ---------------------


def test_collect_download_never_writes_outside_its_folder(tmp_path, s3_server):
    client, run_root = s3_server["client"], f"{PREFIX}/runs/r1/"
    depth = "../" * (len(tmp_path.parts) + 3)
    hostile = {
        run_root + "../../escaped-rel.txt": b"x",
        run_root + depth + str(tmp_path / "escaped-deep.txt").lstrip("/"): b"x",
        run_root + "/" + str(tmp_path / "escaped-abs.txt"): b"x",
        run_root + "baseline/": b"",  # what an S3 console's "Create folder" makes
        run_root: b"",
        run_root + "vat/.hidden": b"x",
    }
    for key, body in hostile.items():
        put(client, key, body)
    put(client, run_root + "report.json", b'{"run_id": "r1"}')
    put(client, run_root + "baseline/model.pt", b"weights")
    env = s3_job_env(tmp_path, tmp_path, s3_server)
    result = run_job(env, "collect", "--run", "r1", "--download", str(tmp_path / "dl"))
    assert result.returncode == 8, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert named(tmp_path, {"escaped-rel.txt", "escaped-deep.txt", "escaped-abs.txt", ".hidden"}) == []
    assert (tmp_path / "dl/r1/report.json").read_bytes() == b'{"run_id": "r1"}'
    assert (tmp_path / "dl/r1/baseline/model.pt").read_bytes() == b"weights", "a folder marker is not a file"
    assert result.stderr.count("not a plain relative path") == len(hostile) - 2
    assert result.stderr.count("warning:") == result.stderr.count("a folder marker") == 2, "markers: warned, skipped"
    assert "no manifest.json" in result.stderr
    bad_id = run_job(env, "collect", "--run", "../../x", "--download", str(tmp_path / "dl"))
    assert bad_id.returncode == 2 and "not a run id" in bad_id.stderr


@pytest.mark.slow
def test_the_job_resumes_past_hostile_keys_and_folder_markers(tmp_path, mnist_dir, s3_server):
    """A resume fetches only checkpoints, final models and the log (run.RESUME_FILES), and each through the path
    check (storage.download -> untrusted.path_inside). Keys that climb out are dropped by the first; a key the first
    lets through still cannot leave the run folder through a phase folder that is a symbolic link. The output
    folder sits deep in tmp_path, so that wherever an escaping key would land, this test looks."""
    client, run_root = s3_server["client"], f"{PREFIX}/runs/r2/"
    output = tmp_path / "a" / "b" / "c" / "runs"
    planted = {
        "baseline/../../escaped-1.txt": b"1",  # -> output/
        "../../../escaped-2.txt": b"2",  # -> tmp_path/a/b/
        "/" + str(tmp_path / "escaped-3.txt"): b"3",
        "vat//checkpoint-0000002.pt": b"4",
        "plots/planted.png": b"5",  # a plain name, but not what a resume needs
        "vat/model.pt": b"planted model",  # through the symbolic link below
    }
    for key, body in planted.items():
        put(client, run_root + key, body, sha256_hex(body))
    put(client, run_root + "baseline/", b"")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (output / "r2").mkdir(parents=True)
    (output / "r2" / "vat").symlink_to(elsewhere)
    result = run_job(s3_job_env(tmp_path, mnist_dir, s3_server, RUN_ID="r2", OUTPUT_DIR=output))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    seen = events(result.stdout)
    (ready,) = [e for e in seen if e["event"] == "storage_ready"]
    assert ready["fetched_for_resume"] == []
    skipped = [e["key"] for e in seen if e["event"] == "object_skipped"]
    assert skipped == [run_root + "vat/model.pt"], "the path check refused the one key the filter let through"
    assert named(tmp_path, {"escaped-1.txt", "escaped-2.txt", "escaped-3.txt", "planted.png"}) == []
    assert not [p for p in files_outside(tmp_path, output / "r2") if p.read_bytes() in planted.values()]
    assert (output / "r2/baseline/model.pt").is_file() and "manifest.json" in objects(client, "r2")


# --- row 3: uploads that fail are storage errors (exit 4), local artifacts kept ---------------------------


@pytest.mark.slow
def test_every_put_answered_503_mid_run_is_exit_4_with_local_artifacts(tmp_path, mnist_dir, s3_server):
    proxy = FaultProxy(s3_server["endpoint"])
    try:
        env = s3_job_env(tmp_path, mnist_dir, s3_server, RUN_ID="r503", S3_MAX_ATTEMPTS="2")
        env["AWS_ENDPOINT_URL"] = proxy.url
        with RunningJob(env, limit_s=240) as job:
            job.until(lambda r: r["event"] == "training_started")
            proxy.mode = "fail_put"
            code, rest = job.finish(timeout=240)
    finally:
        proxy.close()
    seen = events(rest)
    assert code == 4, rest[-3000:]
    assert seen[-1]["event"] == "storage_error" and "ServiceUnavailable" in seen[-1]["message"]
    assert "checkpoint_upload_failed" in [e["event"] for e in seen]
    assert (tmp_path / "runs/r503/report.json").is_file() and (tmp_path / "runs/r503/vat/model.pt").is_file()


def test_an_upload_that_does_not_arrive_intact_is_a_storage_error(tmp_path, aws_env):
    """The proxy loses the last byte of every upload and the server answers 200: only the check after the upload
    (the stored size and the recorded sha256 against the file) can tell."""
    proxy = FaultProxy(aws_env["endpoint"])
    try:
        store = RunStore(make_client(proxy.url, max_attempts=1), BUCKET, PREFIX, "truncated")
        path = tmp_path / "checkpoint-0000002.pt"
        path.write_bytes(os.urandom(5000))
        store.upload(path, "vat/checkpoint-0000002.pt")  # passes through intact
        proxy.mode = "truncate_put"
        with pytest.raises(StorageError, match="did not arrive intact"):
            store.upload(path, "vat/checkpoint-0000004.pt")
    finally:
        proxy.close()
    sizes = {name: entry["Size"] for name, entry in objects(aws_env["client"], "truncated").items()}
    assert sizes == {"vat/checkpoint-0000002.pt": 5000, "vat/checkpoint-0000004.pt": 4999}, "the server took it"


def test_the_final_upload_sends_again_what_the_bucket_holds_damaged_and_only_that(tmp_path, aws_env):
    from job.layout import RunLayout

    layout = RunLayout(tmp_path / "skip")
    files = {"report.json": b"{}", "vat/model.pt": os.urandom(3000), "log.jsonl": b"{}\n"}
    for name, body in files.items():
        (layout.root / name).parent.mkdir(parents=True, exist_ok=True)
        (layout.root / name).write_bytes(body)
    proxy = FaultProxy(aws_env["endpoint"])
    try:
        store = RunStore(make_client(proxy.url), BUCKET, PREFIX, "skip")
        store.upload_run(layout)
        client, key = aws_env["client"], f"{PREFIX}/runs/skip/"
        put(client, key + "vat/model.pt", files["vat/model.pt"][:-1], sha256_hex(files["vat/model.pt"]))  # truncated
        put(client, key + "report.json", files["report.json"], "0" * 64)  # another sha256 recorded
        proxy.requests.clear()
        store.upload_run(layout)
    finally:
        proxy.close()
    sent = sorted(path.removeprefix(f"/{BUCKET}/{key}") for method, path in proxy.requests if method == "PUT")
    assert sent == ["manifest.json", "report.json", "vat/model.pt"], "log.jsonl arrived intact: not sent again"
    for name, body in files.items():
        assert client.get_object(Bucket=BUCKET, Key=key + name)["Body"].read() == body, name


# --- row 4: SIGTERM ends any wait within the grace period --------------------------------------------------


@pytest.mark.slow
def test_sigterm_while_the_server_hangs_exits_5_well_within_the_grace_period(tmp_path, mnist_dir, s3_server):
    proxy = FaultProxy(s3_server["endpoint"])
    try:
        steps = dict(TRAIN_STEPS=TRAIN_STEPS_PAST_A_SIGNAL, CHECKPOINT_EVERY="1000")
        env = s3_job_env(tmp_path, mnist_dir, s3_server, RUN_ID="hung", **steps)
        env["AWS_ENDPOINT_URL"] = proxy.url
        with RunningJob(env) as job:
            job.until(lambda r: r["event"] == "progress" and r["phase"] == "vat")  # the job waits on this test
            proxy.mode = "hang"  # accepts connections and requests, never answers
            job.send(signal.SIGTERM)
            code, rest = job.finish(timeout=90)
            took = job.took()
    finally:
        proxy.close()
    print(f"SIGTERM to exit with a hung storage server: {took:.1f} s")
    assert code == 5, rest[-2000:]
    assert took < 40, f"{took:.1f} s from SIGTERM to exit (the grace period is 60 s)"
    assert events(rest)[-1]["event"] == "interrupted"
    assert list((tmp_path / "runs/hung/vat").glob("checkpoint-*.pt")), "the SIGTERM checkpoint is kept locally"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_hung_mnist_download_ends_it_at_once(tmp_path, signum):
    mirror = Mirror({}, hang=True)
    try:
        env = job_env(tmp_path, tmp_path / "data", RUN_ID="dl", MNIST_MIRRORS=mirror.url, DOWNLOAD_TIMEOUT_S="300")
        with RunningJob(env, limit_s=180) as job:
            assert mirror.asked.wait(120), "the job never asked the mirror"  # now inside urlopen, waiting
            job.send(signum)
            code, rest = job.finish(timeout=60)
            took = job.took()
    finally:
        mirror.close()
    assert code == 5, rest
    assert took < 10, f"{took:.1f} s from the signal to exit"
    assert events(rest)[-1]["event"] == "interrupted"


# --- row 5 and 14: what a resume downloads is verified; the earlier attempts' log is kept ------------------


@pytest.mark.slow
def test_a_checkpoint_changed_in_the_bucket_is_not_used_and_the_log_is_kept(tmp_path, mnist_dir, s3_server):
    import shutil

    client = s3_server["client"]
    env = s3_job_env(tmp_path, mnist_dir, s3_server, RUN_ID="tampered")
    first = run_job(env)
    assert first.returncode == 0, first.stdout[-2000:]
    report_before = json.loads((tmp_path / "runs/tampered/report.json").read_text())
    key = f"{PREFIX}/runs/tampered/vat/checkpoint-0000004.pt"
    original = client.get_object(Bucket=BUCKET, Key=key)
    body = bytearray(original["Body"].read())
    body[len(body) // 2] ^= 0x01  # one flipped bit in the weights: torch.load would not notice
    put(client, key, bytes(body), original["Metadata"]["sha256"])  # the recorded sha256 kept
    # a well-formed file in the wrong place, with a sha256 that matches its bytes: loads, but is not this phase's
    other = (tmp_path / "runs/tampered/baseline/checkpoint-0000006.pt").read_bytes()
    put(client, f"{PREFIX}/runs/tampered/vat/checkpoint-0000003.pt", other, hashlib.sha256(other).hexdigest())
    shutil.rmtree(tmp_path / "runs")

    again = run_job(env)
    assert again.returncode == 0, again.stdout[-3000:]
    seen = events(again.stdout)
    refused = [e for e in seen if e["event"] == "object_not_verified"]
    assert [e["key"] for e in refused] == [key] and "differs from the one recorded" in refused[0]["reason"]
    inconsistent = [e for e in seen if e["event"] == "checkpoint_corrupt"]
    assert [e["path"].rsplit("/", 2)[-2:] for e in inconsistent] == [["vat", "checkpoint-0000003.pt"]]
    assert [(e["phase"], e["step"]) for e in seen if e["event"] == "resumed"] == [("baseline", 6), ("vat", 2)]
    report_after = json.loads((tmp_path / "runs/tampered/report.json").read_text())
    assert report_after["models"]["vat"]["mnist_test"] == report_before["models"]["vat"]["mnist_test"]
    repaired = client.get_object(Bucket=BUCKET, Key=key)
    assert hashlib.sha256(repaired["Body"].read()).hexdigest() == repaired["Metadata"]["sha256"]
    log_lines = [json.loads(x) for x in (tmp_path / "runs/tampered/log.jsonl").read_text().splitlines()]
    assert [x["event"] for x in log_lines].count("run_started") == 2, "the first attempt's log lines are kept"


# --- row 8: one run id, one writer --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_job_on_the_same_run_is_refused_on_this_machine_and_across_nodes(tmp_path, mnist_dir, s3_server):
    env = s3_job_env(tmp_path / "a", mnist_dir, s3_server, RUN_ID="twice", TRAIN_STEPS=TRAIN_STEPS_PAST_A_SIGNAL)
    with RunningJob(env) as first:
        first.until(lambda r: r["event"] == "training_started")  # from here it waits on this test (RunningJob)
        local_only = {k: v for k, v in env.items() if k != "VAT_S3_BUCKET"}
        same_folder = run_job({**local_only, "VAT_SEED": "7", "VAT_LOCK_WAIT_S": "0"}, timeout=120)
        other_node = run_job(
            {**env, "VAT_SEED": "7", "VAT_LOCK_WAIT_S": "1", "VAT_OUTPUT_DIR": str(tmp_path / "b/runs")}, timeout=120
        )
        first.send(signal.SIGTERM)
        code, _ = first.finish(timeout=60)
    assert code == 5, "the first job was still training when the other two were refused"
    assert same_folder.returncode == 7, same_folder.stdout[-2000:]
    assert events(same_folder.stdout)[-1]["event"] == "run_locked"
    assert "in use by pid" in events(same_folder.stdout)[-1]["message"]
    assert other_node.returncode == 7, other_node.stdout[-2000:]
    message = events(other_node.stdout)[-1]["message"]
    assert "is being written by" in message and "lease" in message
    assert not list((tmp_path / "b/runs/twice").glob("*/*.pt")), "the refused job wrote nothing"
    # the first job (exit 5) released its lease: the run may be resumed at once, on any node
    assert "Contents" not in s3_server["client"].list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/locks/twice")


def test_a_stale_lease_of_a_killed_job_is_taken_over_after_it_expires(tmp_path, aws_env):
    store = RunStore(make_client(), BUCKET, PREFIX, "stale")
    dead = RunLock(tmp_path / "node-a", store, lease_s=1.0)
    dead.acquire(wait_s=0)
    dead._done.set()  # killed: no more renewals, no release
    alive = RunLock(tmp_path / "node-b", store, min_lease_s=1.0)
    with pytest.raises(RunLocked, match="is being written by"):
        alive.acquire(wait_s=0)
    # The lease's age is the server's clock (its Date header minus the object's Last-Modified, in whole seconds):
    # no event announces the expiry, so this polls for it, bounded.
    wait_until(lambda: alive.acquire(wait_s=0) or True, limit_s=15, what="the expired lease taken over")
    holder = json.loads(aws_env["client"].get_object(Bucket=BUCKET, Key=alive.key)["Body"].read())
    assert holder["token"] == alive.owner["token"]
    alive.release()
    assert "Contents" not in aws_env["client"].list_objects_v2(Bucket=BUCKET, Prefix=alive.key)


# --- rows 9 and 10: collect shows the good runs and says which are damaged ----------------------------------


@pytest.mark.slow
def test_collect_reports_damaged_runs_and_verifies_downloads_against_the_manifest(tmp_path, mnist_dir, s3_server):
    client = s3_server["client"]
    env = s3_job_env(tmp_path, mnist_dir, s3_server, S3_PREFIX="damage")
    assert run_job({**env, "VAT_RUN_ID": "good"}).returncode == 0
    for run_id in ("truncated", "lying"):  # whole copies of the good run (objects and metadata), then damaged
        for key in objects(client, "good", prefix="damage"):
            source = {"Bucket": BUCKET, "Key": f"damage/runs/good/{key}"}
            client.copy_object(Bucket=BUCKET, Key=f"damage/runs/{run_id}/{key}", CopySource=source)
        copied = json.loads(client.get_object(Bucket=BUCKET, Key=f"damage/runs/{run_id}/manifest.json")["Body"].read())
        put(client, f"damage/runs/{run_id}/manifest.json", json.dumps({**copied, "run_id": run_id}).encode())
    listing = json.loads(run_job(env, "collect", "--format", "json").stdout)["runs"]
    statuses = {row["run_id"]: row["status"] for row in listing}
    assert statuses == dict.fromkeys(("good", "truncated", "lying"), "complete"), "sound copies before the damage"
    report_key = "damage/runs/truncated/report.json"
    put(client, report_key, client.get_object(Bucket=BUCKET, Key=report_key)["Body"].read()[:100])
    manifest_key = "damage/runs/lying/manifest.json"
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
    manifest["run_id"] = "someone-else"
    manifest["files"]["plots/missing.png"] = {"size": 10, "sha256": "0" * 64}
    manifest["files"]["report.json"]["sha256"] = "0" * 64
    put(client, manifest_key, json.dumps(manifest).encode())

    listing = run_job(env, "collect", "--format", "json")
    assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing.stderr
    rows = {row["run_id"]: row for row in json.loads(listing.stdout)["runs"]}
    assert rows["good"]["status"] == "complete" and rows["good"]["vat.mnist_test.accuracy"] is not None
    assert rows["truncated"]["status"] == "damaged" and "report.json is not valid JSON" in rows["truncated"]["problem"]
    assert rows["lying"]["status"] == "damaged" and "someone-else" in rows["lying"]["problem"]
    assert "plots/missing.png is in the manifest but not in the bucket" in rows["lying"]["problem"]

    good = run_job(env, "collect", "--run", "good", "--download", str(tmp_path / "dl"))
    assert good.returncode == 0 and not good.stderr, good.stderr
    lying = run_job(env, "collect", "--run", "lying", "--download", str(tmp_path / "dl"))
    assert lying.returncode == 8, lying.stdout + lying.stderr
    for fragment in ("someone-else", "plots/missing.png: in the manifest but not downloaded", "report.json: sha256"):
        assert fragment in lying.stderr


# --- row 12: a full disk is its own exit code and message ---------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_is_exit_9_with_a_clear_line(tmp_path, mnist_dir):
    env = job_env(tmp_path, mnist_dir, RUN_ID="full")
    result = run_job(env, limit_file_bytes=200_000)  # a checkpoint is larger: EFBIG
    assert result.returncode == 9, result.stdout[-2000:] + result.stderr[-2000:]
    last = events(result.stdout)[-1]
    assert last["event"] == "disk_full" and "no space left to write" in last["message"]
    assert not [p for p in (tmp_path / "runs/full").rglob(".*.tmp")], "no temporary file left behind"


# --- secrets: never in a log line ---------------------------------------------------------------------------


def test_log_lines_mask_url_credentials_and_tracebacks_carry_no_local_variables():
    import io

    from job import logs

    stream = io.StringIO()
    logs.configure_logging("json", "debug", stream=stream)
    log = logs.get_logger()
    log.warning("mnist_download_failed", url="http://user:hunter2@mirror/x.gz", urls=["https://tok3n@b/"])

    def failing(secret_key="hunter2-local"):
        raise ValueError("boom")

    try:
        failing()
    except ValueError:
        log.exception("internal_error")
    logs.configure_logging("json", "info")
    text = stream.getvalue()
    assert "hunter2" not in text and "tok3n" not in text
    assert "http://***@mirror/x.gz" in text and '"internal_error"' in text
