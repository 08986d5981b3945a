"""One vat-job run, top to bottom: settings -> MNIST -> seeded split -> baseline -> VAT -> evaluation -> reports.

`python -m job` (or the `vat-job` console script) lands in `job.cli.main`, which loads the settings, maps
errors to exit codes, and calls `run_job` below. This module never imports `cli`.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from job import data, evaluate, logs, report, storage, train
from job.checkpoint import CHECKPOINT_PATTERN, checkpoint_step, list_checkpoints, prune_checkpoints, superseded
from job.device import configure_backend, resolve_device
from job.layout import EXPORTED_MODEL, FINAL_MODEL, LOG, PHASES, RunLayout, atomic_write_bytes, write_json
from job.lock import RunLock
from job.model import exported
from job.progress import Progress
from job.settings import Settings
from job.stop import UPLOAD_GRACE_S, Interrupted, StopFlag, Stopped

# What a resume takes from the bucket: checkpoints, final models and the earlier attempts' log; nothing else.
RESUME_FILES = re.compile(
    rf"(?:{'|'.join(PHASES)})/(?:{CHECKPOINT_PATTERN.pattern[1:-1]}|{re.escape(FINAL_MODEL)})|{re.escape(LOG)}"
)


def run_job(settings: Settings, stop: StopFlag, log: Any) -> dict[str, Any]:
    began = time.perf_counter()
    startup_seconds = seconds_since_process_start()  # Python, torch and the job's imports
    device = resolve_device(settings.device)
    configure_backend(device, settings.deterministic)
    layout = RunLayout.of(settings.output_dir, settings.run_id)
    fresh = not layout.root.exists()
    with stop.waiting(0):  # nothing to save yet: a signal ends these waits at once
        store = storage.open_run_store(settings) if settings.s3_bucket else None  # fails fast, before training
        if store and not store.conditional_writes:
            problem = (
                f"the S3 server at {settings.s3_endpoint_url or 'the configured endpoint'} ignores conditional "
                "writes (If-None-Match): a second job on this run id on another node cannot be refused"
            )
            if settings.s3_conditional_writes == "require":
                raise storage.StorageError(f"{problem}; VAT_S3_CONDITIONAL_WRITES=require refuses such a server")
            log.warning("conditional_writes_ignored", message=f"{problem}; only the local lock holds")
        lock = RunLock(layout.root, store)
        lock.acquire(settings.lock_wait_s, on_wait=log.warning)
    with released_at_exit(lock, stop):  # one writer per run id (job/lock.py), released whatever happens
        fetched: list[str] = []
        if store:
            with stop.waiting(0):
                fetched = store.download(
                    layout.root,
                    only=lambda rel: (
                        RESUME_FILES.fullmatch(rel) is not None and not (rel == LOG and layout.log.exists())
                    ),
                    on_problem=log.warning,
                )
        logs.open_run_log(layout.log)  # appends: a resumed run's log.jsonl keeps the earlier attempts' lines
        log.info(
            "run_started",
            output=str(layout.root),
            device=str(device),
            preset=settings.preset,
            storage=f"s3://{settings.s3_bucket}/{store.run_prefix}" if store else "local only (VAT_S3_BUCKET unset)",
        )
        if store:
            log.info("storage_ready", bucket=settings.s3_bucket, prefix=store.run_prefix, fetched_for_resume=fetched)

        def download_event(event: str, **fields: Any) -> None:  # a file arriving is news, a failure a warning
            (log.info if event == "mnist_file_downloaded" else log.warning)(event, **fields)

        try:
            with stop.waiting(0):
                raw = data.ensure_mnist(
                    settings.data_dir,
                    settings.mnist_mirrors,
                    retries=settings.download_retries,
                    timeout_s=settings.download_timeout_s,
                    on_event=download_event,
                )
        except data.DataError:
            if fresh:  # nothing of this run exists yet: no folder holding only a lock and a log is left behind
                logs.close_run_log()
                if {p.name for p in layout.root.iterdir()} <= {".lock", LOG}:
                    shutil.rmtree(layout.root, ignore_errors=True)
            raise
        split = data.load_mnist(
            raw, settings.test_split_seed, settings.label_split_seed, settings.num_labeled, settings.num_unlabeled
        ).to(device)
        data_seconds = time.perf_counter() - began
        log.info(
            "data_ready",
            labeled=len(split.labeled),
            unlabeled=len(split.unlabeled),
            seeded_test=len(split.seeded_test),
            labeled_class_counts=split.labeled_class_counts(),
            seconds=round(data_seconds, 2),
        )

        hooks = train.Hooks(
            log=log,
            on_progress=Progress(settings, log),
            on_corrupt=lambda path, error: log.warning("checkpoint_corrupt", path=str(path), error=str(error)),
            on_checkpoint=lambda path: upload_as_training_goes(
                store, layout, path, log, stop, lock, settings.keep_checkpoints
            ),
        )
        # Both models train before either is evaluated: on the CPU, evaluation's allocations between the two
        # would fragment the heap that the VAT updates reuse (0.43 -> 0.51 s per update).
        try:
            results = {
                phase: train.train_phase(phase, settings, split, device, layout.phase(phase), stop, hooks)
                for phase in PHASES
            }
        except Interrupted:
            # The log goes with the checkpoint, so that a resume on another node keeps this attempt's lines.
            upload_as_training_goes(store, layout, layout.log, log, stop, lock, settings.keep_checkpoints)
            raise
        models = {}
        for phase, result in results.items():
            per_set = settings.eval_images or len(split.test_images)
            log.info("evaluating", phase=phase, images=2 * per_set)
            models[phase] = {
                **evaluate.evaluate(result.model, split, settings.eval_batch_size, settings.eval_images),
                "steps": result.steps,
                "train_seconds": result.train_seconds,
                "resumed_from_step": result.resumed_from,
            }
            log.info(
                "evaluated",
                phase=phase,
                **{
                    f"{t}_{m}": round(models[phase][t][m], 4)
                    for t in ("seeded_test", "mnist_test")
                    for m in ("accuracy", "macro_f1")
                },
            )

        # The VAT model as a program that loads with torch alone (torch.export), for use without this package.
        program = exported(results["vat"].model)
        with warnings.catch_warnings():  # torch's note on tensor groups when saving to a stream: not ours to act on
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            atomic_write_bytes(layout.phase("vat") / EXPORTED_MODEL, lambda handle: torch.export.save(program, handle))

        if settings.plots:
            from job import plots  # matplotlib only now, and only for plots: it need not sit in memory while training

            labeled = split.labeled.cpu()
            plots.plot_labeled_images(layout, split.train_images.cpu()[labeled], split.train_labels.cpu()[labeled])
            plots.plot_losses(layout, {name: r.history for name, r in results.items()})
            plots.plot_confusion_matrices(layout, models)
        timings = {
            "startup": startup_seconds,
            "data": round(data_seconds, 3),
            "total": round(time.perf_counter() - began, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if device.type == "cuda":
            timings["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        split_info = {
            "labeled_indices": split.labeled.cpu().tolist(),
            "labeled_class_counts": split.labeled_class_counts(),
            "num_unlabeled": len(split.unlabeled),
            "num_seeded_test": len(split.seeded_test),
        }
        summary = report.build_report(
            settings.run_id, settings.public_dict(), report.environment(device), split_info, models, timings
        )
        write_json(layout.report, summary)
        report.write_summary(layout, summary, Settings.model_construct().public_dict())
        log.info(
            "run_finished",
            report=str(layout.report),
            seconds=timings["total"],
            baseline_mnist_test_accuracy=models["baseline"]["mnist_test"]["accuracy"],
            vat_mnist_test_accuracy=models["vat"]["mnist_test"]["accuracy"],
        )
        if store:
            logs.close_run_log()  # the log is complete: what follows goes to stdout only
            lock.check()  # never two writers: a job whose lease was taken over does not write the manifest
            for phase in PHASES:  # a resume may have fetched older checkpoints than the kept ones: not shipped
                for newest, _ in list_checkpoints(layout.phase(phase))[:1]:
                    prune_checkpoints(layout.phase(phase), newest, settings.keep_checkpoints)
            log.info("uploading", to=f"s3://{settings.s3_bucket}/{store.run_prefix}")
            with stop.waiting(UPLOAD_GRACE_S):
                manifest = store.upload_run(
                    layout, on_event=log.info, stale=lambda rel: checkpoint_step(rel.rpartition("/")[2]) is not None
                )
            log.info("run_uploaded", bucket=settings.s3_bucket, prefix=store.run_prefix, files=len(manifest["files"]))
            if settings.promote_to:
                from job import promote

                with stop.waiting(UPLOAD_GRACE_S):  # bounded after a signal like every other wait on the bucket
                    promote.promote_run(store, summary, settings, log)  # raises promote.GateRefused
        return summary


@contextlib.contextmanager
def released_at_exit(lock: RunLock, stop: StopFlag) -> Iterator[None]:
    try:
        yield
    finally:
        try:
            with stop.waiting(UPLOAD_GRACE_S):
                lock.release()
        except Stopped:
            pass  # out of grace: the lease expires by itself (job/lock.py); the local lock died with us anyway


def seconds_since_process_start() -> float | None:
    """Wall time since the kernel started this process (Linux), to show start-up beside the job's own time."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 2)  # field 22: starttime, in ticks
    except (OSError, ValueError, IndexError):
        return None


def upload_as_training_goes(
    store: storage.RunStore | None, layout: RunLayout, path: Any, log: Any, stop: StopFlag, lock: RunLock, keep: int
) -> None:
    """Checkpoints reach the bucket as they are written; once one has arrived, the bucket's older ones beyond the
    newest `keep` are deleted. A failed upload is retried by the final upload if the run folder still keeps it."""
    if store is None:
        return
    lock.check()  # a job whose lease was taken over (it stalled past the lease) stops writing: exit 7
    relative = path.relative_to(layout.root).as_posix()
    try:
        with stop.waiting(UPLOAD_GRACE_S):
            store.upload(path, relative)
        log.info("log_uploaded" if relative == LOG else "checkpoint_uploaded", file=relative)
    except storage.StorageError as error:
        log.warning("checkpoint_upload_failed", path=str(path), error=str(error), kept_locally=True)
        return
    written = checkpoint_step(path.name)
    if written is not None and not stop.is_set():  # after a signal, the grace is the upload's
        delete_older_checkpoints(store, path.parent.name, written, keep, lock, stop, log)


def delete_older_checkpoints(
    store: storage.RunStore, phase: str, written: int, keep: int, lock: RunLock, stop: StopFlag, log: Any
) -> None:
    """Once checkpoint `written` of `phase` has arrived, the bucket keeps the newest `keep` of each phase (judged
    from its own listing, so uploads that failed leave older ones in place) and deletes the rest."""
    try:
        with stop.waiting(0):  # a signal ends it at once: the loop then writes and uploads its checkpoint
            lock.check()  # never delete what a job that took the lease over may be resuming from
            remote: dict[str, dict[int, str]] = {name: {} for name in PHASES}
            for relative in store.remote_objects():
                folder, _, name = relative.partition("/")
                step = checkpoint_step(name)
                if folder in remote and step is not None:
                    remote[folder][step] = relative
            for name, steps in remote.items():
                for step in superseded(steps, written if name == phase else max(steps, default=0), keep):
                    store.delete(steps[step])
                    log.info("checkpoint_deleted", file=steps[step])
    except Stopped:
        pass
    except storage.StorageError as error:  # the next checkpoint's upload tries again
        log.warning("checkpoint_delete_failed", error=str(error))
