"""One run id, one writer: a second job on the same run is refused (after waiting up to VAT_LOCK_WAIT_S).

Two locks, both taken before anything is written to the run folder or the bucket:
- on this machine, an exclusive `flock` on `<run folder>/.lock`: the kernel drops it when the process dies,
  however it dies, so it is never stale;
- in the bucket (two nodes sharing it), a lease object `<prefix>/locks/<run_id>.json` created with a
  conditional write (`If-None-Match: *`: of two jobs racing, exactly one creates it), renewed every
  RENEW_EVERY_S by a background thread (`If-Match` on its ETag: a job that lost its lease notices), deleted when
  the job ends. A job killed without a chance to delete it (SIGKILL, a lost node) leaves a lease that is no
  longer renewed; after `lease_s` seconds without renewal (measured with the server's clock: the response's Date
  minus the object's Last-Modified) any job may take it over, again conditionally on its ETag.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path

from job.storage import STORAGE_ERRORS, RunStore, StorageError, http_status
from job.untrusted import MAX_DOCUMENT_BYTES, Lease, Untrusted, parse

LEASE_S = 120.0
MIN_LEASE_S = 60.0  # two renewals: a shorter lease_s in another job's lease object is read as this
RENEW_EVERY_S = 30.0
RETRY_EVERY_S = 5.0


class RunLocked(Exception):
    """Another job is writing this run (on this machine, or on a node sharing the bucket)."""


class RunLock:
    """Held from `acquire` to `release`; `lost` says whether the bucket lease was taken from us."""

    def __init__(
        self, folder: Path, store: RunStore | None, lease_s: float = LEASE_S, min_lease_s: float = MIN_LEASE_S
    ) -> None:
        self.folder, self.store, self.lease_s, self.min_lease_s = folder, store, lease_s, min_lease_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.key = f"{store.prefix + '/' if store and store.prefix else ''}locks/{store.run_id}.json" if store else ""
        self._fd: int | None = None
        self._etag: str | None = None
        self._done = threading.Event()
        self.lost = False
        self.took_over: str | None = None  # whose expired lease this job took, for the log

    # --- acquiring -------------------------------------------------------------------------------

    def acquire(self, wait_s: float, on_wait: Callable[..., None] = lambda event, **kw: None) -> None:
        """Take both locks, retrying every RETRY_EVERY_S for up to `wait_s` seconds; raise RunLocked after."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._try_local()
                if self.store is not None:
                    self._try_bucket()
                break
            except RunLocked as held:
                self._release_local()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                on_wait("run_locked_waiting", reason=str(held), waiting_s=round(left, 1))
                time.sleep(min(RETRY_EVERY_S, left))
        if self.took_over:
            on_wait("run_lease_taken_over", previous_holder=self.took_over, lease=self.key)
        if self.store is not None:
            threading.Thread(target=self._renew, name="run-lease", daemon=True).start()

    def _try_local(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(f"run folder {self.folder} is in use by {holder} on this machine") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "lease_s": self.lease_s, "renewed_at": time.time()}).encode()

    def _try_bucket(self) -> None:
        store = self.store
        assert store is not None
        try:
            self._etag = store.client.put_object(Bucket=store.bucket, Key=self.key, Body=self._body(), IfNoneMatch="*")[
                "ETag"
            ]
            return
        except STORAGE_ERRORS as error:
            if http_status(error) not in (409, 412):
                raise StorageError(f"run lease s3://{store.bucket}/{self.key}: {error}") from None
        try:
            held = store.client.get_object(Bucket=store.bucket, Key=self.key)
            body = held["Body"].read(MAX_DOCUMENT_BYTES + 1)
            server_now = parsedate_to_datetime(held["ResponseMetadata"]["HTTPHeaders"]["date"])
            age = (server_now - held["LastModified"]).total_seconds()
        except STORAGE_ERRORS as error:
            if http_status(error) == 404:  # released between our two requests: try again at once
                return self._try_bucket()
            raise StorageError(f"run lease s3://{store.bucket}/{self.key}: {error}") from None
        except (ValueError, KeyError, TypeError, AttributeError):  # no usable Date header: a fresh lease
            age = 0.0
        # The lease's own lease_s is another job's word: used only within [min_lease_s, LEASE_MAX_S]. A lease that
        # fails its schema is held for our own lease_s since its last write, never taken over at once.
        try:
            holder = parse(body, Lease, "lease")
            who, lease = f"{holder.host} pid {holder.pid}", max(holder.lease_s, self.min_lease_s)
        except Untrusted as error:
            who, lease = f"an unreadable lease ({error})", self.lease_s
        if age <= lease:
            raise RunLocked(
                f"run {store.run_id} is being written by {who} "
                f"(lease renewed {age:.0f} s ago, expires after {lease:.0f} s without renewal; "
                f"if that job is dead, run again after that or delete s3://{store.bucket}/{self.key})"
            )
        try:  # a dead job's lease: take it over, unless another job does so first
            self._etag = store.client.put_object(
                Bucket=store.bucket, Key=self.key, Body=self._body(), IfMatch=held["ETag"]
            )["ETag"]
        except STORAGE_ERRORS as error:
            if http_status(error) in (404, 409, 412):
                raise RunLocked(f"run {store.run_id}: another job took over the expired lease first") from None
            raise StorageError(f"run lease s3://{store.bucket}/{self.key}: {error}") from None
        self.took_over = f"{who}, last renewed {age:.0f} s ago (lease {lease:.0f} s)"

    # --- holding and releasing -------------------------------------------------------------------

    def _renew(self) -> None:
        store = self.store
        assert store is not None
        while not self._done.wait(RENEW_EVERY_S):
            try:
                self._etag = store.client.put_object(
                    Bucket=store.bucket, Key=self.key, Body=self._body(), IfMatch=self._etag
                )["ETag"]
            except STORAGE_ERRORS as error:
                if http_status(error) in (404, 409, 412):
                    self.lost = True  # taken over: the final upload refuses to write
                    return
                # the server is unreachable for now: the next renewal tries again

    def check(self) -> None:
        if self.lost:
            raise RunLocked(f"the lease on run {self.store.run_id if self.store else ''} was taken by another job")

    def release(self) -> None:
        """Drop both locks; the bucket lease only if it is still ours (best effort: a stale lease expires)."""
        self._done.set()
        self._release_local()
        if self.store is not None and self._etag is not None and not self.lost:
            try:
                self.store.client.delete_object(Bucket=self.store.bucket, Key=self.key, IfMatch=self._etag)
            except STORAGE_ERRORS:
                pass
            self._etag = None

    def _release_local(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
