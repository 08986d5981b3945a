"""The command line: `vat-job` (run the job) and `vat-job collect`; the only place errors become exit codes.

Exit codes (documented in docs/operations.md):
  0  success
  1  unexpected internal error (a bug: the traceback is in the log line)
  2  configuration error: a setting is invalid, or a run id is reused with other training settings
  3  data error: MNIST missing, corrupt and not downloadable
  4  storage error: the bucket is unreachable, missing or access is denied (local artifacts are kept)
  5  interrupted by SIGTERM/SIGINT: a checkpoint was written (or nothing was trained yet); run again with the same
     VAT_RUN_ID to resume. Every wait (network, download, upload) is bounded so that this comes within the grace
  6  quality gate refused (VAT_PROMOTE_TO): the run is complete and kept in the bucket, but its model was not
     promoted (not accurate enough on validation data, worse than the promoted one, or drifted too far below the
     recent promoted ones); the Job fails so that alerts fire
  7  run locked: another job is writing the same run id (this machine, or a node sharing the bucket)
  8  verification failed (collect --download): the run's files do not match its manifest, or keys were unsafe
  9  disk full: the run folder could not be written (no space or quota); what was written before is kept
 10  no GPU visible: VAT_DEVICE=cuda, but this node shows the process no CUDA device (a fault of the node more
     often than of the settings); another node may have a working one

On Kubernetes (every podFailurePolicy in k8s/ follows FAIL_JOB and RETRIED below; tests/test_deploy.py checks):
2 and 6 fail the Job at once (a sweep: that seed only), since a retry cannot help; 10 is retried on a new pod,
which the scheduler places afresh; the others are retried within the Job's backoffLimit.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from job import logs
from job.layout import unwritable
from job.settings import ConfigError, load_settings

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_STORAGE = 4
EXIT_INTERRUPTED = 5
EXIT_GATE_REFUSED = 6
EXIT_LOCKED = 7
EXIT_UNVERIFIED = 8
EXIT_DISK_FULL = 9
EXIT_NO_GPU = 10

FAIL_JOB = (EXIT_CONFIG, EXIT_GATE_REFUSED)  # podFailurePolicy FailJob (FailIndex in a sweep): a retry cannot help
RETRIED = (EXIT_NO_GPU,)  # podFailurePolicy Count: a new pod, another node with luck

USAGE = """usage: vat-job [run]         train the baseline and the VAT model, evaluate, report, upload
       vat-job collect         list, compare and fetch runs from the bucket (vat-job collect --help)
       vat-job predict         classify PNG or MNIST IDX images with a trained model (vat-job predict --help)
       vat-job --version

Settings come from VAT_* environment variables and .env (docs/configuration.md lists every one; .env.example is
a copy to start from). A first run that takes about a minute on a CPU: VAT_PRESET=smoke vat-job
Exit codes: docs/operations.md."""


def entrypoint() -> None:
    """`vat-job` and `python -m job`: run `main`, flush, and leave without the interpreter's teardown.

    Every artifact is written atomically and every log line flushed before this point; what remains at exit
    is freeing modules, tensors and the CUDA context, 1.2-1.5 s of a 2+2-update job on the CPU (BENCHMARKS.md).
    """
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `vat-job collect | head`: the reader left, so do we, quietly
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return EXIT_OK
    if args and args[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"vat-job {version('vat-job')}")
        return EXIT_OK
    if args and args[0] == "collect":
        from job.collect import main as collect_main

        return collect_main(args[1:])
    if args and args[0] == "predict":
        from job.predict import main as predict_main

        return predict_main(args[1:])
    if args and args[0] != "run" or len(args) > 1:
        print(f"vat-job: unknown command or argument {' '.join(args)!r}\n{USAGE}", file=sys.stderr)
        return EXIT_CONFIG
    return run()


def run() -> int:
    fallback_format = os.environ.get("VAT_LOG_FORMAT", "auto")
    logs.configure_logging(fallback_format if fallback_format in ("json", "console") else "auto")
    log = logs.get_logger()
    try:
        settings = load_settings()
    except ConfigError as error:
        log.error("config_error", message=str(error), exit_code=EXIT_CONFIG)
        return EXIT_CONFIG
    logs.configure_logging(settings.log_format, settings.log_level)
    logs.bind_run(settings.run_id)
    log = logs.get_logger()
    began = time.monotonic()
    ended: dict[str, Any] = {}  # what the run leaves for its end: its report, the gate's refusal
    code = run_to_exit_code(settings, log, ended)
    if code == EXIT_GATE_REFUSED:
        write_termination_message(settings.termination_message_path, f"quality gate refused: {ended['refusal']}")
    if settings.pushgateway_url:
        from job import metrics

        verdict = gate_verdict(code, gated=bool(settings.promote_to))
        metrics.push_run(settings, code, verdict, ended.get("report"), time.monotonic() - began, log)
    if code == EXIT_OK and ended.get("report"):
        say_summary(settings, ended["report"], log)
    return code


def say_summary(settings: Any, report: dict[str, Any], log: Any) -> None:
    """The run's last lines: a table at a terminal, one `summary` line in JSON."""
    from job.progress import summary_table

    where = str(settings.output_dir / settings.run_id)
    if settings.s3_bucket:
        where += f" and s3://{settings.s3_bucket}/{settings.s3_prefix}/runs/{settings.run_id}/"
    if logs.resolved_format == "console":
        print(summary_table(report, where), end="", flush=True)
        return
    models = report["models"]
    log.info(
        "summary",
        **{
            f"{m}_{t}_{k}": round(models[m][t][k], 4)
            for m in models
            for t in ("seeded_test", "mnist_test")
            for k in ("accuracy", "macro_f1")
        },
        seconds=report["timings_s"]["total"],
        files=where,
    )


def gate_verdict(code: int, gated: bool) -> str:
    """promoted (a gated run that exits 0: promoted now, or by an earlier pod of the same run), refused, not_gated."""
    if code == EXIT_GATE_REFUSED:
        return "refused"
    return "promoted" if gated and code == EXIT_OK else "not_gated"


def run_to_exit_code(settings: Any, log: Any, ended: dict[str, Any]) -> int:
    unwritable = output_dir_problem(settings.output_dir)
    if unwritable:
        log.error("config_error", message=unwritable, exit_code=EXIT_CONFIG)
        return EXIT_CONFIG

    # Imported here so that `vat-job --help` and settings errors answer without loading torch.
    from job.checkpoint import ResumeMismatch
    from job.data import DataError
    from job.device import NoGpuVisible
    from job.layout import DiskFull
    from job.lock import RunLocked
    from job.promote import GateRefused
    from job.run import run_job
    from job.stop import Interrupted, StopFlag, Stopped
    from job.storage import StorageError

    stop = StopFlag()
    stop.install()
    try:
        ended["report"] = run_job(settings, stop, log)
        return EXIT_OK
    except (ConfigError, ResumeMismatch) as error:
        log.error("config_error", message=str(error), exit_code=EXIT_CONFIG)
        return EXIT_CONFIG
    except StorageError as error:
        folder = settings.output_dir / settings.run_id
        kept = {"local_artifacts": str(folder), "hint": "run again with the same VAT_RUN_ID to upload what is missing"}
        log.error("storage_error", message=str(error), exit_code=EXIT_STORAGE, **(kept if folder.is_dir() else {}))
        return EXIT_STORAGE
    except GateRefused as error:
        log.error("quality_gate_refused", message=str(error), exit_code=EXIT_GATE_REFUSED, **error.verdict)
        ended["refusal"] = str(error)
        return EXIT_GATE_REFUSED
    except NoGpuVisible as error:
        log.error("no_gpu_visible", message=str(error), exit_code=EXIT_NO_GPU)
        return EXIT_NO_GPU
    except DataError as error:
        log.error("data_error", message=str(error), exit_code=EXIT_DATA)
        return EXIT_DATA
    except Interrupted as error:
        log.warning(
            "interrupted",
            signal=stop.signal_name,
            phase=error.phase,
            step=error.step,
            checkpoint=str(error.checkpoint),
            exit_code=EXIT_INTERRUPTED,
            message="run again with the same VAT_RUN_ID to resume",
        )
        return EXIT_INTERRUPTED
    except Stopped as error:
        log.warning(
            "interrupted",
            signal=error.signal_name,
            message=f"{error}; local artifacts kept in {settings.output_dir / settings.run_id}: "
            "run again with the same VAT_RUN_ID to resume",
            exit_code=EXIT_INTERRUPTED,
        )
        return EXIT_INTERRUPTED
    except RunLocked as error:
        log.error("run_locked", message=str(error), exit_code=EXIT_LOCKED)
        return EXIT_LOCKED
    except DiskFull as error:
        log.error(
            "disk_full",
            message=f"{error}: free space under VAT_OUTPUT_DIR, then run again with the same VAT_RUN_ID to resume",
            exit_code=EXIT_DISK_FULL,
        )
        return EXIT_DISK_FULL
    except Exception:
        log.exception("internal_error", exit_code=EXIT_INTERNAL)
        return EXIT_INTERNAL
    finally:
        logs.close_run_log()


def write_termination_message(path: Path, message: str) -> None:
    """Kubernetes shows this file's text as the container's termination message (`kubectl describe pod`, at most
    4,096 bytes); where it does not exist (docker, a laptop) nothing is written."""
    try:
        if path.is_file() and os.access(path, os.W_OK):
            path.write_bytes(message.encode()[:4096])
    except OSError:
        pass  # a message for people, never a reason to change the exit code


def output_dir_problem(folder: Path) -> str | None:
    """One line on why this process cannot write under VAT_OUTPUT_DIR (created if missing), else None.

    Checked before torch is even loaded. The usual cause is a container: `docker run -v "$PWD/runs:/output"`
    makes a missing host folder owned by root, and the image's user (10001) cannot write to a root-owned one.
    """
    why = unwritable(folder)
    if why:
        return (
            f"VAT_OUTPUT_DIR={folder} is not writable by this process (uid {os.getuid()}, gid {os.getgid()}): "
            f"{why}; make it writable by that user, or with docker run create the host folder "
            f'first (mkdir -p runs) and pass --user "$(id -u):$(id -g)"'
        )
    return None
