"""Issue 22, the second outside probe: each row as a test against real servers on 127.0.0.1 (moto; s3rver, which
ignores conditional writes; a basic-auth MNIST mirror; a mirror that serves a corrupt gzip) and the real CLI."""

import gzip
import hashlib
import json
import random
from pathlib import Path

import pytest

from job.layout import RunLayout
from job.lock import RunLock, RunLocked
from job.storage import RunStore, make_client
from tests.support import (
    BUCKET,
    Mirror,
    files_outside,
    job_env,
    put,
    run_job,
    s3_job_env,
    s3rver_on_loopback,
    wait_until,
)
from tests.support import sha256_hex as sha

SECRET = "supersecret7"


def collect_env(tmp_path: Path, server: dict, prefix: str, **settings) -> dict:
    """For `collect` (no MNIST needed) on `server` under `prefix`."""
    return s3_job_env(tmp_path, tmp_path / "no-mnist", server, S3_PREFIX=prefix, **settings)


def intact_run(client, prefix, run_id, accuracy=0.98, group="g", created="2026-11-2{}T02:00:00+00:00", day=1):
    """A run as the job leaves it (report, model, manifest with sha256 metadata), without training one."""
    metrics = {"accuracy": accuracy, "macro_f1": accuracy}
    report = {
        "run_id": run_id,
        "group": group,
        "created_at": created.format(day),
        "settings": {"run_group": group, "label_split_seed": day, "train_steps": 6000},
        "models": {m: {"seeded_test": metrics, "mnist_test": metrics} for m in ("baseline", "vat")},
    }
    files = {"report.json": json.dumps(report).encode(), "vat/model.pt": b"weights-" + run_id.encode()}
    for name, body in files.items():
        put(client, f"{prefix}/runs/{run_id}/{name}", body, sha(body))
    manifest = {"run_id": run_id, "files": {n: {"size": len(b), "sha256": sha(b)} for n, b in files.items()}}
    body = json.dumps(manifest).encode()
    put(client, f"{prefix}/runs/{run_id}/manifest.json", body, sha(body))
    return report


def pointer_for(prefix, run_id="r1", accuracy=0.98, **changes):
    files = {
        name: {"key": f"{prefix}/latest/runs/{run_id}/{name}", "size": 1, "sha256": "0" * 64}
        for name in ("model.pt", "report.json")
    }
    return {"run_id": run_id, "metric": "vat.mnist_test.accuracy", "accuracy": accuracy, "files": files, **changes}


# --- High: path traversal through collect --promoted --------------------------------------------------------


def test_collect_promoted_never_writes_where_a_forged_pointer_says(tmp_path, s3_server):
    client, prefix = s3_server["client"], "forged"
    body = b"planted"
    put(client, f"{prefix}/latest/runs/r1/x", body, sha(body))
    escape = str(tmp_path / "escaped.txt")
    forged = pointer_for(prefix)
    forged["files"] = {
        f"/../../{escape}": {"key": f"{prefix}/latest/runs/r1/x", "size": len(body), "sha256": sha(body)},
        "model.pt": {"key": f"{prefix}/latest/runs/r1/x", "size": len(body), "sha256": sha(body)},
    }
    put(client, f"{prefix}/latest/pointer.json", json.dumps(forged).encode())
    result = run_job(collect_env(tmp_path, s3_server, prefix), "collect", "--promoted", str(tmp_path / "dl"))
    assert result.returncode == 8, result.stdout + result.stderr
    assert "report.json" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "escaped.txt").exists() and files_outside(tmp_path, tmp_path / "dl") == []
    assert not (tmp_path / "dl").exists() or list((tmp_path / "dl").iterdir()) == []


@pytest.mark.parametrize(
    "change,problem",
    [
        ({"accuracy": "0.99"}, "accuracy"),
        ({"accuracy": float("nan")}, "accuracy"),
        ({"files": {}}, "files"),
        ({"run_id": "../../x"}, "run_id"),
        (
            {"files": {n: {"key": "elsewhere/x", "size": 1, "sha256": "0" * 64} for n in ("model.pt", "report.json")}},
            "outside the slot",
        ),
    ],
)
def test_a_garbage_pointer_is_exit_8_for_a_reader_with_nothing_written(tmp_path, s3_server, change, problem):
    client, prefix = s3_server["client"], "garbage-pointer"
    put(client, f"{prefix}/latest/pointer.json", json.dumps(pointer_for(prefix, **change)).encode())
    result = run_job(collect_env(tmp_path, s3_server, prefix), "collect", "--promoted", str(tmp_path / "dl"))
    assert result.returncode == 8 and problem in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and list((tmp_path / "dl").glob("*")) == []


def test_a_garbage_pointer_refuses_promotion_with_its_reason_and_never_overwrites_it(tmp_path, aws_env):
    from job.promote import GateRefused, promote_run

    prefix = "garbage-gate"
    store = RunStore(make_client(), BUCKET, prefix, "night-9")
    layout = RunLayout(tmp_path / "night-9")
    (layout.root / "vat").mkdir(parents=True)
    (layout.root / "vat/model.pt").write_bytes(b"weights")
    aws = aws_env["client"]
    report = json.loads(json.dumps(intact_run(aws, "unused", "night-9")))
    (layout.root / "report.json").write_text(json.dumps(report))
    store.upload_run(layout)
    for garbage in (b"{not json", json.dumps(pointer_for(prefix, accuracy=float("nan"))).encode()):
        put(aws, f"{prefix}/latest/pointer.json", garbage)

        class Settings:
            promote_to, promote_min_accuracy, promote_max_regression = "latest", 0.5, 0.005
            promote_max_drift, promote_drift_window = 0.01, 30

        with pytest.raises(GateRefused, match="restore the pointer") as refused:
            promote_run(store, report, Settings(), log=None)
        assert refused.value.verdict["passed"] is False
        assert aws.get_object(Bucket=BUCKET, Key=f"{prefix}/latest/pointer.json")["Body"].read() == garbage


# --- High and medium: secrets in URLs never printed -------------------------------------------------------


def test_a_mirror_password_goes_as_basic_auth_and_a_corrupt_gzip_moves_on_to_the_next_mirror(tmp_path):
    from job.data import ensure_mnist

    payload = b"the bytes of an MNIST file"
    corrupt = bytearray(gzip.compress(payload * 50))
    corrupt[20:40] = b"\xff" * 20  # the deflate stream is damaged: zlib.error, not a gzip header error
    bad = Mirror({"tiny.gz": bytes(corrupt)})
    good = Mirror({"tiny.gz": gzip.compress(payload)}, user="reader", password="p@ss:w0rd@x")
    events = []
    try:
        mirrors = [f"http://127.0.0.1:{bad.port}/", f"http://reader:p%40ss:w0rd%40x@127.0.0.1:{good.port}/"]
        folder = ensure_mnist(
            tmp_path,
            mirrors,
            expected={"tiny": sha(payload)},
            retries=1,
            backoff_s=0,
            on_event=lambda e, **kw: events.append((e, kw)),
        )
    finally:
        bad.close()
        good.close()
    assert (folder / "tiny").read_bytes() == payload
    assert [e for e, _ in events] == ["mnist_download_failed", "mnist_file_downloaded"]
    assert good.requests == ["/tiny.gz"]


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["json", "console"])
@pytest.mark.parametrize("userinfo", [f"user:{SECRET}", f"user:{SECRET}@more", f"{SECRET}"])
def test_a_mirror_url_with_a_password_never_prints_it(tmp_path, log_format, userinfo):
    mirror = f"https://{userinfo}@127.0.0.1/"  # no port: urllib used to read the password as one
    env = job_env(tmp_path, tmp_path / "empty", MNIST_MIRRORS=mirror, DOWNLOAD_RETRIES="1", LOG_FORMAT=log_format)
    result = run_job(env, timeout=120)
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert SECRET not in output and "Traceback" not in output
    assert "data_error" in output


@pytest.mark.parametrize(
    "name,value,named",
    [
        ("VAT_S3_ENDPOINT_URL", f"user:{SECRET}@127.0.0.1:9", "VAT_S3_ENDPOINT_URL"),
        ("VAT_S3_ENDPOINT_URL", "127.0.0.1:5055", "VAT_S3_ENDPOINT_URL"),
        ("AWS_ENDPOINT_URL", f"user:{SECRET}@127.0.0.1:9", "AWS_ENDPOINT_URL"),
        ("VAT_MNIST_MIRRORS", f"https://u:{SECRET}@127.0.0.1:99999/", "VAT_MNIST_MIRRORS"),
        ("VAT_TRAIN_STEPS", "1e20", "VAT_TRAIN_STEPS"),
        ("VAT_DOWNLOAD_TIMEOUT_S", "1e300", "VAT_DOWNLOAD_TIMEOUT_S"),
        ("VAT_S3_CONNECT_TIMEOUT_S", "1e300", "VAT_S3_CONNECT_TIMEOUT_S"),
    ],
)
def test_bad_settings_are_exit_2_naming_the_variable_without_its_secret(tmp_path, name, value, named):
    env = job_env(tmp_path, tmp_path / "empty", S3_BUCKET=BUCKET)
    env[name] = value
    result = run_job(env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["event"] == "config_error" and named in last["message"]
    assert SECRET not in result.stdout + result.stderr


def test_every_numeric_setting_has_an_upper_bound():
    from annotated_types import Le, Lt

    from job.settings import Settings

    for name, field in Settings.model_fields.items():
        kind = field.annotation
        if kind in (int, float, int | None, float | None):
            assert any(isinstance(m, Le | Lt) for m in field.metadata), f"VAT_{name.upper()} has no upper bound"


def test_a_job_name_with_a_time_no_cronjob_writes_is_a_plain_run_id():
    from job.runid import kubernetes_run_id

    assert kubernetes_run_id("nightly-9999999999", "abc", "nightly") == "nightly-9999999999-abc"


# --- Medium: collect over damaged documents, a full disk, an unwritable folder, folder markers -----------------


def test_collect_lists_the_intact_runs_beside_reports_of_every_wrong_shape(tmp_path, s3_server):
    client, prefix = s3_server["client"], "shapes"
    intact_run(client, prefix, "good-1", day=1)
    intact_run(client, prefix, "good-2", day=2)
    metrics = {"accuracy": 0.9, "macro_f1": 0.9}
    base = {
        "run_id": "x",
        "created_at": "2026-11-25T00:00:00+00:00",
        "settings": {"run_group": "g"},
        "models": {m: {"seeded_test": metrics, "mnist_test": metrics} for m in ("baseline", "vat")},
    }
    shapes = {
        "models-list": {**base, "models": []},
        "settings-list": {**base, "settings": [1]},
        "int-time": {**base, "created_at": 1},
        "zzzz-time": {**base, "created_at": "zzzz"},
        "string-acc": {
            **base,
            "models": {
                **base["models"],
                "vat": {"seeded_test": metrics, "mnist_test": {"accuracy": "1", "macro_f1": 1}},
            },
        },
        "group-escape": {**base, "group": "../../../x", "settings": {"run_group": "../../../x"}},
    }
    for run_id, report in shapes.items():
        put(client, f"{prefix}/runs/{run_id}/report.json", json.dumps(report).encode())
    put(client, f"{prefix}/runs/deep/report.json", b"[" * 100_000 + b"]" * 100_000)
    env = collect_env(tmp_path, s3_server, prefix)
    listing = run_job(env, "collect", "--format", "json")
    assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing.stderr
    rows = {row["run_id"]: row for row in json.loads(listing.stdout)["runs"]}
    assert rows["good-1"]["status"] == rows["good-2"]["status"] == "complete"
    assert {r for r, row in rows.items() if row["status"] == "damaged"} == {*shapes, "deep"}
    trend = run_job(env, "collect", "--group", "g", "--trend", timeout=120, cwd=tmp_path)
    assert trend.returncode == 0 and "good-1" in trend.stdout and "Traceback" not in trend.stderr, trend.stderr
    assert [p.name for p in tmp_path.rglob("*.png")] == ["trend-g.png"] and (tmp_path / "trend-g.png").is_file()


def test_collect_download_onto_a_full_disk_is_exit_9_with_no_part_file(tmp_path, s3_server):
    client, prefix = s3_server["client"], "fulldisk"
    intact_run(client, prefix, "big")
    big = b"z" * 300_000
    put(client, f"{prefix}/runs/big/vat/checkpoint-0000002.pt", big, sha(big))
    result = run_job(
        collect_env(tmp_path, s3_server, prefix),
        "collect",
        "--run",
        "big",
        "--download",
        str(tmp_path / "dl"),
        limit_file_bytes=100_000,
    )
    assert result.returncode == 9, result.stdout + result.stderr
    assert "no space" in result.stderr and "Traceback" not in result.stderr
    assert [p for p in (tmp_path / "dl").rglob("*.part")] == []


def test_collect_download_into_an_unwritable_folder_names_the_folder(tmp_path, s3_server):
    intact_run(s3_server["client"], "unwritable", "r1")
    (tmp_path / "a-file").write_text("not a folder")
    result = run_job(
        collect_env(tmp_path, s3_server, "unwritable"),
        "collect",
        "--run",
        "r1",
        "--download",
        str(tmp_path / "a-file" / "dl"),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot write to" in result.stderr and "a-file" in result.stderr and "manifest" not in result.stderr


def test_a_folder_marker_beside_an_intact_run_is_a_warning_not_a_failure(tmp_path, s3_server):
    intact_run(s3_server["client"], "markers", "r1")
    put(s3_server["client"], "markers/runs/r1/plots/", b"")
    result = run_job(
        collect_env(tmp_path, s3_server, "markers"), "collect", "--run", "r1", "--download", str(tmp_path / "dl")
    )
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "folder marker" in result.stderr
    assert (tmp_path / "dl/r1/vat/model.pt").read_bytes() == b"weights-r1"


# --- Low: a lease's own numbers are another job's word ------------------------------------------------------


@pytest.mark.parametrize("body", [b'{"host": "h", "lease_s": -5}', b'{"host": "h", "lease_s": 0.001}', b"garbage"])
def test_a_lease_with_a_nonsense_or_garbage_lifetime_is_not_taken_over_at_once(tmp_path, aws_env, body):
    store = RunStore(make_client(), BUCKET, "leases", f"r-{hashlib.md5(body).hexdigest()[:6]}")
    probe = RunLock(tmp_path / "a", store)
    put(aws_env["client"], probe.key, body)
    with pytest.raises(RunLocked, match="is being written by"):
        RunLock(tmp_path / "b", store).acquire(wait_s=0)


def test_an_infinite_lease_does_not_lock_a_run_forever_and_a_takeover_is_logged(tmp_path, aws_env):
    store = RunStore(make_client(), BUCKET, "leases", "forever")
    taker = RunLock(tmp_path / "b", store, lease_s=1.0, min_lease_s=1.0)  # its own lease: 1 s, for the test
    put(aws_env["client"], taker.key, b'{"host": "h", "pid": 1, "lease_s": 1e999}')
    with pytest.raises(RunLocked):
        taker.acquire(wait_s=0)
    events = []
    # The lease's age is the server's clock (its Date header minus the object's Last-Modified, in whole seconds):
    # no event announces the expiry, so this polls for it, bounded.
    wait_until(
        lambda: taker.acquire(wait_s=0, on_wait=lambda event, **kw: events.append((event, kw))) or True,
        limit_s=15,
        what="the unreadable lease taken over",
    )
    taker.release()
    assert [e for e, _ in events] == ["run_lease_taken_over"] and "unreadable lease" in events[0][1]["previous_holder"]


# --- Low: after a recovery rerun the bucket keeps VAT_KEEP_CHECKPOINTS per phase ------------------------------


@pytest.mark.slow
def test_the_final_upload_leaves_only_the_kept_checkpoints_in_the_bucket(tmp_path, mnist_dir, s3_server):
    client = s3_server["client"]
    env = s3_job_env(tmp_path, mnist_dir, s3_server, S3_PREFIX="keep", RUN_ID="keep-1", KEEP_CHECKPOINTS="2")
    first = run_job(env)
    assert first.returncode == 0, first.stdout[-3000:]
    # What a failed earlier attempt leaves: an older checkpoint in the bucket, and no manifest yet.
    old = b"an older checkpoint"
    put(client, "keep/runs/keep-1/baseline/checkpoint-0000002.pt", old, sha(old))
    client.delete_object(Bucket=BUCKET, Key="keep/runs/keep-1/manifest.json")
    again = run_job(env)
    assert again.returncode == 0, again.stdout[-3000:]
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix="keep/runs/keep-1/")["Contents"]
    names = {item["Key"].rsplit("/runs/keep-1/", 1)[1] for item in listing}
    for phase in ("baseline", "vat"):
        assert len([n for n in names if n.startswith(f"{phase}/checkpoint-")]) == 2, sorted(names)
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key="keep/runs/keep-1/manifest.json")["Body"].read())
    assert set(manifest["files"]) | {"manifest.json"} == names


# --- Medium: a server that ignores conditional writes (s3rver) is found out before training ------------------


@pytest.fixture(scope="module")
def s3rver():
    with s3rver_on_loopback(BUCKET) as server:
        yield server


def test_preflight_tells_a_server_with_conditional_writes_from_one_without(s3_server, s3rver, monkeypatch):
    import boto3

    for server, honours in ((s3_server, True), (s3rver, False)):
        for name, value in server["env"].items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # its credentials are cached: each server has its own
        assert RunStore(make_client(), BUCKET, "probe", "r").preflight() is honours


@pytest.mark.slow
def test_on_s3rver_the_job_warns_or_with_require_refuses_before_training(tmp_path, mnist_dir, s3rver):
    env = s3_job_env(tmp_path, mnist_dir, s3rver, S3_PREFIX="s3rver", RUN_ID="s3rver-1")
    refused = run_job({**env, "VAT_S3_CONDITIONAL_WRITES": "require"}, timeout=120)
    assert refused.returncode == 4, refused.stdout[-2000:]
    last = json.loads(refused.stdout.splitlines()[-1])
    assert last["event"] == "storage_error" and "ignores conditional writes" in last["message"]
    assert "training_started" not in refused.stdout
    warned = run_job(env)
    assert warned.returncode == 0, warned.stdout[-3000:]
    seen = [json.loads(line)["event"] for line in warned.stdout.splitlines() if line.startswith("{")]
    assert "conditional_writes_ignored" in seen and seen.index("conditional_writes_ignored") < seen.index("run_started")
    assert "run_uploaded" in seen


# --- the border under a bucket of generated garbage ----------------------------------------------------------


def garbage_bucket(client, prefix, rng: random.Random, planted: str, aws_secret: str) -> None:
    """Keys and bodies drawn from what breaks readers: traversal, markers, deep JSON, wrong shapes, and secrets
    (a URL password, and the job's own AWS secret key) where a careless reader would print them."""
    keys = ["../../x", "/abs/x", "a//b", ".hidden", "dir/", "", "vat/../../../../escape.txt", "ok.txt", "\x01ctl"]
    bodies = [
        b"",
        b"{",
        b"[" * 5000,
        json.dumps({"run_id": "../../x", "created_at": "zzzz"}).encode(),
        json.dumps({"settings": {"mnist_mirrors": [f"https://u:{planted}@m/"]}, "models": []}).encode(),
        json.dumps({"run_id": 1, "files": {"/etc/passwd": {"size": 1, "sha256": "x"}}}).encode(),
        json.dumps(pointer_for(prefix, run_id=f"{aws_secret}-run", accuracy=float("nan"))).encode(),
        bytes(rng.getrandbits(8) for _ in range(64)),
    ]
    for _ in range(40):
        run_id = rng.choice(["g1", "g2", "g3", "../up", f"{aws_secret}-run", "ok-run", "x" * 200])
        name = rng.choice([*keys, "report.json", "manifest.json", "vat/model.pt"])
        body = rng.choice(bodies)
        put(client, f"{prefix}/runs/{run_id}/{name}", body, sha(body) if rng.random() < 0.5 else None)
    put(client, f"{prefix}/latest/pointer.json", rng.choice(bodies))
    event = {"verdict": "refused", "run_id": "ok-run", "at": "2026-11-30T02:00:00+00:00", "metric": "m"}
    bodies += [
        json.dumps({**event, "candidate": 0.9, "reason": f"see https://u:{planted}@h/ and {aws_secret}"}).encode(),
        json.dumps({**event, "candidate": 0.9, "reason": "\x1b]0;owned\x07"}).encode(),
        json.dumps({**event, "candidate": float("nan"), "run_id": "../../x"}).encode(),
    ]
    for name in [*keys, *(f"20261130T0200000000{i:02d}Z-refused-ok-run.json" for i in range(6))]:
        put(client, f"{prefix}/latest/history/{name}", rng.choice(bodies))
    leaky = intact_run(client, prefix, "leaky", day=3, group="nightly")
    leaky["settings"]["s3_endpoint_url"] = f"https://u:{planted}@h/"  # a valid report quoting a secret
    put(client, f"{prefix}/runs/leaky/report.json", json.dumps(leaky).encode())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_collect_over_a_bucket_of_garbage_never_escapes_never_leaks_never_crashes(tmp_path, s3_server, seed):
    client, prefix, planted = s3_server["client"], f"garbage-{seed}", "planted-secret-9z"
    aws_secret = s3_server["env"]["AWS_SECRET_ACCESS_KEY"]
    garbage_bucket(client, prefix, random.Random(seed), planted, aws_secret)
    for day in (1, 2):
        intact_run(client, prefix, f"intact-{day}", day=day, group="nightly")
    env = collect_env(tmp_path, s3_server, prefix)
    work = tmp_path / "work"
    work.mkdir()
    calls = [
        ["collect"],
        ["collect", "--format", "json"],
        ["collect", "--format", "csv"],
        ["collect", "--group", "nightly", "--trend"],
        ["collect", "--promoted", str(work / "promoted")],
        ["collect", "--promoted-history"],
        ["collect", "--promoted-history", "--format", "csv"],
        *[["collect", "--run", r, "--download", str(work / "dl")] for r in ("g1", "g2", "g3", "ok-run", "intact-1")],
    ]
    for args in calls:
        result = run_job(env, *args, timeout=120, cwd=work)
        output = result.stdout + result.stderr
        assert "Traceback" not in output and result.returncode in (0, 2, 4, 8), (
            args,
            result.returncode,
            output[-2000:],
        )
        assert planted not in output and "\x1b" not in output, (args, output[-2000:])
        if args[1:] == ["--format", "json"]:
            rows = {row["run_id"]: row for row in json.loads(result.stdout)["runs"]}
            assert rows["intact-1"]["status"] == rows["intact-2"]["status"] == "complete"
    assert files_outside(tmp_path, work) == [], "nothing written outside the working folder"
    assert (work / "dl/intact-1/vat/model.pt").read_bytes() == b"weights-intact-1"
