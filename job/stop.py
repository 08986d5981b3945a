"""Stopping on SIGTERM/SIGINT: the flag the training loop checks between updates, what it raises once the
checkpoint is written, and the bound on every wait (network, download, upload) after a signal.

`cli.py` installs the flag and turns `Interrupted` and `Stopped` into exit code 5.

Kubernetes grants `terminationGracePeriodSeconds` (60 s in the manifests) between SIGTERM and SIGKILL. Training
checks the flag after each update; a wait on the network cannot check anything, so every such wait runs inside
`StopFlag.waiting(grace_s)`: once a signal has arrived, it may go on for at most `grace_s` seconds counted from
the signal (0: it ends at once), after which `Stopped` is raised in the main thread (from the signal handler or
a SIGALRM timer), whatever the socket is doing.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What the SIGTERM checkpoint's upload (or the final upload) may still take after the signal: with one update
# and the checkpoint write before it, and the exit after it, SIGTERM to exit stays well under 60 s.
UPLOAD_GRACE_S = 20.0


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint at `step`."""

    def __init__(self, phase: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"{phase} stopped at step {step} on a signal; checkpoint {checkpoint}")
        self.phase, self.step, self.checkpoint = phase, step, checkpoint


class Stopped(BaseException):
    """A signal arrived while the job waited on the network or a download, and the wait's grace ran out.

    A BaseException, like KeyboardInterrupt, so that no library's `except Exception` retries through it."""

    def __init__(self, signal_name: str, grace_s: float) -> None:
        super().__init__(f"stopped by {signal_name} during a wait that did not end within {grace_s:g} s")
        self.signal_name, self.grace_s = signal_name, grace_s


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between updates and checkpoints before leaving."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name = ""
        self.signalled_at: float | None = None
        self._grace: float | None = None  # the grace of the wait in progress, None outside waits
        self._installed = False

    def set(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        if not self._event.is_set():
            self.signal_name = signal.Signals(signum).name
            self.signalled_at = time.monotonic()
        self._event.set()
        if self._grace is not None and threading.current_thread() is threading.main_thread():
            self._arm()

    def is_set(self) -> bool:
        return self._event.is_set()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.set)
        signal.signal(signal.SIGINT, self.set)
        signal.signal(signal.SIGALRM, self._expired)
        self._installed = True

    def _expired(self, signum: int = signal.SIGALRM, frame: Any = None) -> None:
        if self._grace is not None:
            raise Stopped(self.signal_name, self._grace)

    def _arm(self) -> None:
        """Raise Stopped now if the grace is spent, else when it will be (SIGALRM)."""
        assert self._grace is not None and self.signalled_at is not None
        remaining = self._grace - (time.monotonic() - self.signalled_at)
        if remaining <= 0 or not self._installed:
            raise Stopped(self.signal_name, self._grace)
        signal.setitimer(signal.ITIMER_REAL, remaining)

    @contextmanager
    def waiting(self, grace_s: float) -> Iterator[None]:
        """A wait that may last at most `grace_s` seconds after a signal (counted from the signal)."""
        outer = self._grace
        self._grace = grace_s if outer is None else min(outer, grace_s)
        try:
            if self.is_set():
                self._arm()
            yield
        finally:
            self._grace = outer
            if outer is None and self._installed:
                signal.setitimer(signal.ITIMER_REAL, 0)
