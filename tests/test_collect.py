"""`vat-job collect`: groups, filtering, time order and the trend, against a real S3-compatible server (moto)."""

import json

import pytest

from job import collect, history, trend
from job.storage import RunStore, make_client
from tests.support import BUCKET, RecordingLog

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
            "models": {  # the validation (seeded_test) accuracy a little above the test set's
                "vat": {
                    "seeded_test": {"accuracy": round(accuracy + 0.003, 4), "macro_f1": accuracy},
                    "mnist_test": {"accuracy": accuracy, "macro_f1": accuracy - 0.001},
                },
                "baseline": {t: {"accuracy": 0.80, "macro_f1": 0.79} for t in ("seeded_test", "mnist_test")},
            },
        }
        for name in ("report.json", "manifest.json"):
            client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/{run_id}/{name}", Body=json.dumps(report).encode())
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/crashed-early/vat/checkpoint-0000002.pt", Body=b"x")
    for event in VERDICTS:  # what the gate of VAT_PROMOTE_TO=latest recorded
        history.append(client, BUCKET, f"{PREFIX}/latest/", event)
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/latest/history/20261130T000000000000Z-refused-x.json", Body=b"{")
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/latest/history/\x1b[2J.json", Body=b"{}")
    return s3_server


def verdict(run_id, at, verdict, candidate, against=(None, None), drift_floor=None, reason="ok"):
    return {
        "verdict": verdict,
        "run_id": run_id,
        "group": "vat-job-nightly",
        "at": at,
        "metric": "vat.seeded_test.accuracy",
        "candidate": candidate,
        "test_accuracy": round(candidate - 0.003, 4),
        "promoted": against[1],
        "promoted_run_id": against[0],
        "min_accuracy": 0.95,
        "drift_floor": drift_floor,
        "reason": reason,
    }


VERDICTS = [
    verdict(RUNS[0][0], "2026-11-27T03:00:00+00:00", "promoted", 0.9731),
    verdict(RUNS[6][0], "2026-11-28T03:00:00+00:00", "promoted", 0.9742, (RUNS[0][0], 0.9731), 0.9631),
    verdict(RUNS[5][0], "2026-11-29T03:00:00+00:00", "refused", 0.9682, (RUNS[6][0], 0.9742), 0.9642, "too low"),
]


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
    assert [r[2] for r in rows] == ["0.9731", "0.9742", "0.9682"] and rows[2][3] == "-0.0060", "validation"
    assert [r[4] for r in rows] == ["0.9701", "0.9712", "0.9652"], "the test set's beside it"
    assert [r[6:8] for r in rows] == [["promoted", "0.9500"], ["promoted", "0.9631"], ["refused", "0.9642"]]
    assert "history: 1 object(s) under" in err and "refused-x.json is not valid JSON" in err, "named, left out"
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
        promote_max_drift, promote_drift_window = 0.01, 30

    accuracies = {"seeded_test": {"accuracy": 0.97}, "mnist_test": {"accuracy": 0.96}}
    promote_run(store, {"models": {"vat": accuracies}}, S(), RecordingLog())
    code, out, _ = collected(capsys, "--promoted", str(tmp_path / "serving"))
    assert code == 0 and RUNS[0][0] in out
    assert (tmp_path / "serving" / "model.pt").read_bytes() == b"weights"
    assert json.loads((tmp_path / "serving" / "pointer.json").read_text())["run_id"] == RUNS[0][0]


def test_promoted_history_lists_every_verdict_oldest_first(collect_env, capsys):
    code, out, err = collected(capsys, "--promoted-history")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["at", "verdict", "run_id", "group", "val", "acc"]
    assert [line.split()[1:3] for line in lines[1:]] == [[v["verdict"], v["run_id"]] for v in VERDICTS]
    assert lines[3].split()[4:] == ["0.9682", "0.9652", f"{RUNS[6][0]}", "(0.9742)", "0.9642", "too", "low"]
    assert "\x1b" not in out + err and "not valid JSON" in err
    code, out, _ = collected(capsys, "--promoted-history", "--format", "json")
    assert [e["run_id"] for e in json.loads(out)["history"]] == [v["run_id"] for v in VERDICTS]
    code, out, _ = collected(capsys, "--promoted-history", "--format", "csv")
    assert out.splitlines()[0].startswith("verdict,run_id,group,at,metric,candidate,test_accuracy") and code == 0


def test_an_option_a_run_did_not_use_is_not_a_column_of_the_listing():
    # A report records every option, used or not, at the value it had then: the cutout of a run without the
    # consistency term changed nothing, whether the report says 8 (an older default), 4, or nothing (made before the
    # option existed). The listing shows the settings its grouping compares, not the records' noise.
    from job.listing import render_csv, render_table
    from job.untrusted import Report

    def row(run_id, **settings):
        report = {
            "run_id": run_id,
            "created_at": "2026-11-27T02:00:00+00:00",
            "settings": {"label_split_seed": 1, **settings},
        }
        models = {t: {"accuracy": 0.98, "macro_f1": 0.98} for t in ("seeded_test", "mnist_test")}
        return {"run_id": run_id, "status": "complete"} | collect.report_row(
            Report.model_validate_json(json.dumps({**report, "models": {"vat": models, "baseline": models}}))
        )

    unused = [row("before-options"), row("old-default", consistency_weight=0.0, strong_cutout_px=8)]
    unused.append(row("cutout-unused", consistency_weight=0.0, strong_cutout_px=4))
    for listing in (render_table(unused, []), render_csv(unused)):
        assert "strong_cutout_px" not in listing and "consistency_weight" not in listing
    assert len(collect.group_by_configuration(unused)) == 1

    used = [*unused, row("cutout-used", consistency_weight=1.0, strong_cutout_px=4)]
    header = render_table(used, []).splitlines()[0].split()
    assert "consistency_weight" in header and "strong_cutout_px" in header
    assert {r["run_id"]: r["settings"]["strong_cutout_px"] for r in used}["cutout-used"] == 4
    assert len(collect.group_by_configuration(used)) == 2
