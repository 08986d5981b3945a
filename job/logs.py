"""structlog set-up: JSON lines on stdout (or a coloured console form), and a JSON copy in the run folder.

Every line carries an ISO timestamp, the level, the event and the run id. Python warnings and the
standard `logging` records of libraries are routed through the same renderer, so in json mode nothing
reaches stdout that is not a JSON line.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

import structlog

from job.untrusted import mask


def _redact_event(logger: Any, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {key: mask(value) for key, value in event_dict.items()}


def _run_id_once(logger: Any, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """At a terminal: the run id where the run starts and ends only, the time of day without the date, and no
    field that repeats another for machines (job_eta_s beside job_eta)."""
    if event_dict.get("event") not in ("run_started", "run_finished", "config_error"):
        event_dict.pop("run_id", None)
    event_dict.pop("job_eta_s", None)
    if isinstance(event_dict.get("timestamp"), str):
        event_dict["timestamp"] = event_dict["timestamp"][11:19]
    return event_dict


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


# Tracebacks as structured frames, without the frames' local variables: one may hold a credential (botocore's
# frozen credentials).
_TRACEBACKS = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


class _RunLogFile:
    """The run folder's log.jsonl; opened once the run folder is known, appended line by line."""

    def __init__(self) -> None:
        self.handle: TextIO | None = None
        self.tracebacks = _TRACEBACKS
        self.render = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if self.handle is not None:
            event = self.tracebacks(logger, name, dict(event_dict))
            line = self.render(logger, name, _redact_event(logger, name, event))
            try:
                self.handle.write(str(line) + "\n")
                self.handle.flush()
            except OSError:  # disk full: the line still reaches stdout; the file copy stops here
                self.handle = None
        return event_dict


_run_log = _RunLogFile()
resolved_format = "json"  # what "auto" became: console or json


def configure_logging(log_format: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the whole process (log_format: auto, json or console); safe to call again."""
    stream = stream or sys.stdout
    if log_format == "auto":  # a person at a terminal reads lines; docker without -t and Kubernetes keep JSON
        log_format = "console" if stream.isatty() else "json"
    global resolved_format
    resolved_format = log_format
    # An exception travels as `exc_info` to the end: the run log and the JSON renderer turn it into a structured
    # `exception` (a list of frames), the console renderer prints the traceback itself, once (it cannot take
    # the structured form).
    renderers: list[Any]
    if log_format == "console":
        # The traceback as text first, so that it is masked like everything else before it is printed.
        renderers = [
            structlog.processors.format_exc_info,
            _redact_event,
            _run_id_once,
            structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False, pad_event_to=12),
        ]
    else:
        renderers = [_TRACEBACKS, _redact_event, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_event,
            _run_log,
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_and_warnings(level)
    sys.excepthook = _masked_excepthook


def _masked_excepthook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
    """An exception nothing caught (a bug) still prints its traceback, masked like every log line."""
    import traceback

    sys.stderr.write(mask("".join(traceback.format_exception(kind, error, tb))))


def _route_stdlib_and_warnings(level: str) -> None:
    class _ToStructlog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log = structlog.get_logger(record.name)
            log.log(record.levelno, record.getMessage(), logger=record.name)

    root = logging.getLogger()
    root.handlers = [_ToStructlog()]
    root.setLevel(max(_LEVELS[level], logging.WARNING))

    def show_warning(
        message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        structlog.get_logger("warnings").warning(
            "python_warning", category=category.__name__, message=str(message), where=f"{filename}:{lineno}"
        )

    warnings.showwarning = show_warning


def bind_run(run_id: str) -> None:
    structlog.contextvars.bind_contextvars(run_id=run_id)


def open_run_log(path: Path) -> None:
    """Append every following line to `path` as JSON too (kept with the run's artifacts)."""
    close_run_log()
    path.parent.mkdir(parents=True, exist_ok=True)
    _run_log.handle = path.open("a", encoding="utf-8")


def close_run_log() -> None:
    if _run_log.handle is not None:
        _run_log.handle.close()
        _run_log.handle = None


def get_logger(name: str = "vat-job") -> Any:
    return structlog.get_logger(name)
