"""Stopping on SIGTERM/SIGINT: the flag the training loop checks between updates, and what it raises once the
checkpoint is written. `cli.py` installs the flag and turns `Interrupted` into exit code 5."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint at `step`."""

    def __init__(self, phase: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"{phase} stopped at step {step} on a signal; checkpoint {checkpoint}")
        self.phase, self.step, self.checkpoint = phase, step, checkpoint


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between updates and checkpoints before leaving."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name = ""

    def set(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.set)
        signal.signal(signal.SIGINT, self.set)
