"""`vat-job collect`: groups, filtering, time order and the trend, against a real S3-compatible server (moto)."""

import json

import pytest

from job import collect, trend
from job.storage import RunStore, make_client
from tests.support import BUCKET

PREFIX = "collect"
# (run id, group, created_at, label seed, VAT accuracy): the bucket of issue 10, where a sweep's mean over seeds
# used to pool the nightly runs and a one-off with the same settings ("5 runs, label seeds [1, 1, 1, 2, 3]").
RUNS = [
    ("20261127T0200Z-vat-job-nightly-aaaa1111", "vat-job-nightly", "2026-11-27T02:00:31+00:00", 1, 0.9701),
    ("vat-sweep-q9w8e-bbbb2222-2", "vat-sweep-q9w8e", "2026-11-27T10:00:03+00:00", 3, 0.9635),
    ("vat-sweep-q9w8e-bbbb2222-0", "vat-sweep-q9w8e", "2026-11-27T10:00:01+00:00", 1, 0.9747),
    ("vat-sweep-q9w8e-bbbb2222-1", "vat-sweep-q9w8e", "2026-11-27T10:00:02+00:00", 2, 0.9513),
    ("vat-job-x7k2p-cccc3333", "one-off", "2026-11-27T15:00:00+00:00", 1, 0.9690),
    ("20261129T0200Z-vat-job-nightly-dddd4444", "vat-job-nightly", "2026-11-29T02:00:40+00:00", 1, 0.9652),
    ("20261128T0200Z-vat-job-nightly-eeee5555", "vat-job-nightly", "2026-11-28T02:00:12+00:00", 1, 0.9712),
]


@pytest.fixture(scope="module")
def bucket(s3_server):
    client = s3_server["client"]
    for run_id, group, created_at, seed, accuracy in RUNS:
        report = {
            "run_id": run_id,
            "group": group,
            "created_at": created_at,
            "settings": {"run_id": run_id, "run_group": group, "label_split_seed": seed, "epsilon": 2.5}
            # The newest nightly run was made after VAT_HIDDEN_UNITS and VAT_KEEP_CHECKPOINTS existed (the width
            # the one before had, a file count that is not an experiment): still the same configuration.
            | ({"hidden_units": 100, "keep_checkpoints": 2} if created_at.startswith("2026-11-29") else {}),
            "models": {
                "vat": {"mnist_test": {"accuracy": accuracy, "macro_f1": accuracy - 0.001}},
                "baseline": {"mnist_test": {"accuracy": 0.80, "macro_f1": 0.79}},
            },
        }
        for name in ("report.json", "manifest.json"):
            client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/{run_id}/{name}", Body=json.dumps(report).encode())
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/crashed-early/vat/checkpoint-0000002.pt", Body=b"x")
    return s3_server


@pytest.fixture
def collect_env(bucket, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name, value in bucket["env"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VAT_S3_BUCKET", BUCKET)
    monkeypatch.setenv("VAT_S3_PREFIX", PREFIX)
    return tmp_path


def collected(capsys, *args):
    code = collect.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_runs_are_listed_oldest_first_and_groups_are_never_pooled(collect_env, capsys):
    code, out, _ = collected(capsys, "--format", "json")
    assert code == 0
    data = json.loads(out)
    ids = [row["run_id"] for row in data["runs"]]
    by_time = [r[0] for r in sorted(RUNS, key=lambda r: r[2])]
    assert ids == [*by_time, "crashed-early"], "oldest first; a run without a report last"
    summaries = {s["group"]: s for s in data["configurations"]}
    assert set(summaries) == {"vat-job-nightly", "vat-sweep-q9w8e", "one-off"}
    sweep = summaries["vat-sweep-q9w8e"]
    assert sweep["runs"] == 3 and sweep["label_split_seeds"] == [1, 2, 3]
    assert sweep["vat.mnist_test.accuracy"]["mean"] == pytest.approx((0.9635 + 0.9747 + 0.9513) / 3)
    assert summaries["vat-job-nightly"]["runs"] == 3 and summaries["one-off"]["runs"] == 1

    code, table, _ = collected(capsys)
    assert "3 runs of group vat-sweep-q9w8e, one configuration (label seeds [1, 2, 3])" in table
    assert "label seeds [1, 1, 1, 2, 3]" not in table
    header = table.splitlines()[0].split()
    assert header[:4] == ["run_id", "created_at", "status", "group"] and "job_uid" not in header


def test_filter_by_group(collect_env, capsys):
    code, out, _ = collected(capsys, "--group", "vat-sweep-q9w8e", "--format", "csv")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("run_id,created_at,status,group")
    assert [line.split(",")[0] for line in lines[1:]] == [f"vat-sweep-q9w8e-bbbb2222-{i}" for i in range(3)]


def test_trend_of_one_group_as_a_table_and_a_png(collect_env, capsys):
    code, out, err = collected(capsys, "--group", "vat-job-nightly", "--trend")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[1] for r in rows] == [
        "20261127T0200Z-vat-job-nightly-aaaa1111",
        "20261128T0200Z-vat-job-nightly-eeee5555",
        "20261129T0200Z-vat-job-nightly-dddd4444",
    ]
    assert [r[2] for r in rows] == ["0.9701", "0.9712", "0.9652"] and rows[2][3] == "-0.0060"
    png = collect_env / "trend-vat-job-nightly.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot:" in err

    code, _, err = collected(capsys, "--trend")
    assert code == 2 and "--trend needs --group" in err


def test_trend_marks_where_the_configuration_changed(tmp_path):
    """A new image with new defaults makes a step in the nightly's accuracy: the trend says which settings moved,
    not seeds, run ids or output-only settings."""

    def run(run_id, created_at, train_steps, accuracy, **other):
        settings = {"run_id": run_id, "label_split_seed": 1, "train_steps": train_steps, **other}
        return {"run_id": run_id, "created_at": created_at, "settings": settings, trend.VAT: accuracy}

    rows = [
        run("c", "2026-12-03T02:00:00+00:00", 6000, 0.9884, checkpoint_every=1000),
        run("a", "2026-12-01T02:00:00+00:00", 3000, 0.9865, checkpoint_every=500),
        run("b", "2026-12-02T02:00:00+00:00", 6000, 0.9887, checkpoint_every=500),
    ]
    rows = trend.trend_rows(rows, collect.configuration)
    assert [row["run_id"] for row in rows] == ["a", "b", "c"]
    assert [row.get("changed") for row in rows] == [None, "train_steps 3000->6000", None]
    table = trend.render_trend("vat-job-nightly", rows).splitlines()
    assert table[1].endswith("settings changed")
    assert [line.endswith("train_steps 3000->6000") for line in table[2:]] == [False, True, False]
    png = trend.plot_trend("vat-job-nightly", rows, tmp_path / "trend.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_promoted_model_is_fetched_through_its_pointer(collect_env, capsys, tmp_path, monkeypatch):
    from job.promote import promote_run

    monkeypatch.setenv("VAT_S3_PREFIX", "collect-promoted")
    store = RunStore(make_client(), BUCKET, "collect-promoted", RUNS[0][0])
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    store.upload(model, "vat/model.pt")
    store.upload(model, "report.json")  # content does not matter here; the pointer names it

    class S:
        promote_to, promote_min_accuracy, promote_max_regression = "latest", 0.9, 0.005

    class Log:
        def info(self, event, **fields):
            pass

    promote_run(store, {"models": {"vat": {"mnist_test": {"accuracy": 0.97}}}}, S(), Log())
    code, out, _ = collected(capsys, "--promoted", str(tmp_path / "serving"))
    assert code == 0 and RUNS[0][0] in out
    assert (tmp_path / "serving" / "model.pt").read_bytes() == b"weights"
    assert json.loads((tmp_path / "serving" / "pointer.json").read_text())["run_id"] == RUNS[0][0]
