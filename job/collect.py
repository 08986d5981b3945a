"""`vat-job collect`: read runs back from the bucket, as a table for people or JSON/CSV for tools.

    vat-job collect [--format table|json|csv]          every run under s3://<bucket>/<prefix>/runs/, oldest first
    vat-job collect --group NAME                        only the runs of one group (a sweep, the nightly, one-off)
    vat-job collect --group NAME --trend [--plot PNG]   validation accuracy of one group over time, as a table and a
                                                        PNG: promoted and refused runs, the gate's line, changes
    vat-job collect --run RUN_ID --download DIR         fetch one run's artifacts, verified against its manifest
    vat-job collect --promoted DIR                      fetch the promoted model, report and pointer
    vat-job collect --promoted-history                  every promotion and refusal of the gate, oldest first

Runs of the same group (VAT_RUN_GROUP: a sweep's name, the nightly CronJob's name, one-off) and the same
configuration (all settings equal but the seeds and run ids) are summarised together, as mean and standard
deviation, the way papers report them; runs of different groups are never pooled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

from job.layout import MANIFEST, NO_SPACE, REPORT, DiskFull, unwritable
from job.listing import METRICS, metric_name, render_csv, render_table
from job.presets import IMPLICIT_BEFORE_ADDED
from job.runid import RUN_ID_PATTERN
from job.settings import ConfigError, load_settings
from job.storage import RunStore, StorageError, client_from_settings, list_run_ids, runs_root
from job.training_options import as_used
from job.untrusted import Manifest, Report, Untrusted, mask
from job.verify import download_run, fetch_document_or_problem, manifest_problems

# Settings that differ between runs without making them different experiments.
NOT_CONFIGURATION = set(
    """
    run_id seed label_split_seed output_dir data_dir log_format log_level log_every_s s3_bucket s3_prefix
    s3_endpoint_url mnist_mirrors plots label_split_seed_from_index checkpoint_every keep_checkpoints run_group
    job_name job_uid promote_to promote_min_accuracy promote_max_regression promote_max_drift promote_drift_window
    download_retries download_timeout_s
    s3_addressing_style s3_checksums s3_max_attempts s3_connect_timeout_s s3_read_timeout_s s3_conditional_writes
    lock_wait_s pushgateway_url pushgateway_timeout_s termination_message_path
    """.split()
)
NO_GROUP = "(none)"  # reports written before runs had groups


def read_runs(store_for: Any, run_ids: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run; a run whose report or manifest is unreadable, of the wrong shape or inconsistent is
    "damaged", with the reason in `problem`, and the other runs are listed as usual. Both documents pass their
    schema (job.untrusted) before any field of theirs is used."""
    rows = []
    for run_id in run_ids:
        store: RunStore = store_for(run_id)
        objects = store.remote_objects()
        row: dict[str, Any] = {"run_id": run_id, "status": "incomplete", "objects": len(objects)}
        problems = []
        if MANIFEST in objects:
            manifest, problem = fetch_document_or_problem(store, MANIFEST, Manifest)
            problems += [problem] if manifest is None else manifest_problems(manifest, run_id, objects)
        if REPORT in objects:
            report, problem = fetch_document_or_problem(store, REPORT, Report)
            if report is None:
                problems.append(problem)
            else:
                row.update(report_row(report))
        if problems:
            row["status"], row["problem"] = "damaged", "; ".join(problems)
        elif MANIFEST in objects:
            row["status"] = "complete"
        rows.append(row)
    return sort_by_time(rows)


def report_row(report: Report) -> dict[str, Any]:
    """The columns a validated report gives its run's row. Its settings are those the run used: an option it did not
    use reads as today's default (the record may hold an older default, or a value that changed nothing), so the
    listing shows no column that its grouping ignores."""
    settings = as_used({**IMPLICIT_BEFORE_ADDED, **report.settings})
    row: dict[str, Any] = {
        "created_at": report.created_at.astimezone(UTC).isoformat(),
        "settings": settings,
        "group": report.group or settings.get("run_group") or NO_GROUP,
    }
    for model, test_set, metric in METRICS:
        row[metric_name(model, test_set, metric)] = getattr(getattr(getattr(report.models, model), test_set), metric)
    return row


def sort_by_time(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Oldest first (created_at is ISO 8601 UTC, so it sorts as text); runs without a report last, by id."""
    return sorted(rows, key=lambda row: (row.get("created_at") is None, row.get("created_at") or "", row["run_id"]))


def only_group(rows: list[dict[str, Any]], group: str) -> list[dict[str, Any]]:
    return [row for row in rows if row.get("group") == group]


def configuration(row: dict[str, Any]) -> dict[str, Any]:
    """The settings that make a run the experiment it is (all but seeds, names and output-only settings; options
    that were not used at their defaults)."""
    return as_used({k: v for k, v in row.get("settings", {}).items() if k not in NOT_CONFIGURATION})


def group_by_configuration(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if "settings" not in row:
            continue
        config = configuration(row)
        groups.setdefault(json.dumps([row["group"], config], sort_keys=True), []).append(row)
    summaries = []
    for key, members in groups.items():
        group, config = json.loads(key)
        summary: dict[str, Any] = {
            "group": group,
            "configuration": config,
            "run_ids": [m["run_id"] for m in members],
            "runs": len(members),
            "label_split_seeds": sorted(m["settings"].get("label_split_seed") for m in members),
        }
        for model, test_set, metric in METRICS:
            values = [
                m[metric_name(model, test_set, metric)]
                for m in members
                if m.get(metric_name(model, test_set, metric)) is not None
            ]
            name = metric_name(model, test_set, metric)
            summary[name] = {
                "mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
            }
        summaries.append(summary)
    return summaries


def emit(*parts: Any, file: Any = None, end: str = "\n") -> None:
    """print, through the masking function: a report or key read from the bucket may quote a planted secret."""
    print(mask(" ".join(str(p) for p in parts)), file=file or sys.stdout, end=end)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="vat-job collect", description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument("--run", help="one run id")
    parser.add_argument("--download", type=Path, help="with --run: fetch the run's artifacts into this folder")
    parser.add_argument("--group", help="only the runs of this group (VAT_RUN_GROUP: sweep name, CronJob name...)")
    parser.add_argument("--trend", action="store_true", help="one group's accuracy over time: a table and a PNG")
    parser.add_argument("--promoted-history", action="store_true", help="the gate's verdicts (of VAT_PROMOTE_TO)")
    parser.add_argument("--plot", type=Path, help="with --trend: where the PNG goes (default trend-<group>.png)")
    parser.add_argument(
        "--promoted",
        type=Path,
        metavar="DIR",
        help="fetch the promoted model.pt, report.json and pointer.json (of VAT_PROMOTE_TO, default latest) into DIR",
    )
    args = parser.parse_args(list(argv))
    try:
        settings = load_settings()
        if not settings.s3_bucket:
            raise ConfigError("VAT_S3_BUCKET is not set: collect reads runs from the bucket")
    except ConfigError as error:
        emit(f"vat-job collect: {error}", file=sys.stderr)
        return 2
    try:
        return _collect(args, settings)
    except StorageError as error:
        emit(f"vat-job collect: {error}", file=sys.stderr)
        return 4
    except Untrusted as error:  # a pointer or document from the bucket that fails its schema
        emit(f"vat-job collect: {error}", file=sys.stderr)
        return 8
    except DiskFull as error:
        emit(f"vat-job collect: {error}", file=sys.stderr)
        return 9
    except OSError as error:  # the destination folder cannot be written
        emit(f"vat-job collect: {error.strerror or error}: {error.filename}", file=sys.stderr)
        return 9 if error.errno in NO_SPACE else 2
    except Exception as error:  # a bug: one masked line, not a traceback that may quote a planted secret
        emit(f"vat-job collect: internal error ({type(error).__name__}: {error})", file=sys.stderr)
        return 1


def flags_that_contradict(args: argparse.Namespace) -> str | None:
    """One line on flags that cannot go together, or None."""
    if args.promoted and (args.run or args.download or args.group or args.trend):
        return "--promoted fetches the promoted model: it takes no --run, --download, --group or --trend"
    if args.download and not args.run:
        return "--download needs --run RUN_ID"
    if args.trend and not args.group:
        return "--trend needs --group NAME (vat-job collect lists the groups)"
    if args.plot and not args.trend:
        return "--plot goes with --trend"
    return None


def _collect(args: argparse.Namespace, settings: Any) -> int:
    client = client_from_settings(settings)

    def store_for(run_id: str) -> RunStore:
        return RunStore(client, settings.s3_bucket, settings.s3_prefix, run_id)

    contradiction = flags_that_contradict(args)
    if contradiction:
        emit(f"vat-job collect: {contradiction}", file=sys.stderr)
        return 2
    for folder in (args.promoted, args.download):
        if folder is not None and (why := unwritable(folder)):
            emit(f"vat-job collect: cannot write to {folder}: {why}", file=sys.stderr)
            return 2
    from job import history
    from job.promote import PromotionSlot, fetch_promoted

    slot = PromotionSlot(client, settings.s3_bucket, settings.s3_prefix, settings.promote_to or "latest")
    if args.promoted:
        pointer = fetch_promoted(slot, args.promoted)
        emit(f"promoted run {pointer.run_id} ({pointer.metric} {pointer.accuracy:.4f}) in {args.promoted}")
        return 0
    if args.promoted_history or args.trend:
        events, problems = history.read(client, settings.s3_bucket, slot.root)
        for problem in problems:
            emit(f"vat-job collect: history: {problem}", file=sys.stderr)
        if args.promoted_history:
            emit(history.render(events, args.format), end="")
            return 0
    where = f"s3://{settings.s3_bucket}/{runs_root(settings.s3_prefix)}"
    if args.run:  # one check for listing and download: a run id, and a run the bucket holds
        if not RUN_ID_PATTERN.fullmatch(args.run):
            emit(f"vat-job collect: --run {args.run!r} is not a run id", file=sys.stderr)
            return 2
        if not store_for(args.run).remote_objects():
            emit(f"vat-job collect: no run {args.run} under {where}", file=sys.stderr)
            return 2
    if args.download:
        fetched, problems, notes = download_run(store_for(args.run), args.download / args.run)
        emit(f"{len(fetched)} files of run {args.run} in {args.download / args.run}")
        for note in notes:
            emit(f"vat-job collect: {args.run}: warning: {note} (skipped)", file=sys.stderr)
        for problem in problems:
            emit(f"vat-job collect: {args.run}: {problem}", file=sys.stderr)
        return 8 if problems else 0
    run_ids = [args.run] if args.run else list_run_ids(client, settings.s3_bucket, settings.s3_prefix)
    if not run_ids:
        emit(f"vat-job collect: no run under {where} (check VAT_S3_PREFIX)", file=sys.stderr)
        return 2
    rows = read_runs(store_for, run_ids)
    for row in rows:
        if "problem" in row:
            emit(f"vat-job collect: run {row['run_id']} is damaged: {row['problem']}", file=sys.stderr)
    if args.group:
        groups_here = sorted({row["group"] for row in rows if "group" in row})
        rows = only_group(rows, args.group)
        if not rows:
            listed = ", ".join(groups_here) or "none"
            emit(f"vat-job collect: no run of group {args.group!r} under {where} (groups: {listed})", file=sys.stderr)
            return 2
    if args.trend:
        from job import trend

        return trend.show(rows, configuration, history.latest_per_run(events), args.format, args.plot, emit)
    groups = group_by_configuration(rows)
    if args.format == "json":
        emit(json.dumps({"runs": rows, "configurations": groups}, indent=2))
    elif args.format == "csv":
        emit(render_csv(rows), end="")
    else:
        emit(render_table(rows, groups), end="")
    return 0
