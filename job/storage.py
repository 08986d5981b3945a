"""S3-compatible object storage: the bucket is the system of record for every run.

    s3://<bucket>/<prefix>/runs/<run_id>/<the run folder's layout>   (manifest.json uploaded last)

Endpoint and credentials come from boto3's own chain (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
profiles, instance roles...), never from VAT_* settings, and are never logged.

The bucket's contents are untrusted input: an object key decides a local path only when every segment of it is
a plain name (no "..", no empty segment, no absolute path, no folder marker, no hidden name), and a download
lands under its final name only once its bytes match the sha256 recorded when it was uploaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from job.layout import MANIFEST, NO_SPACE, DiskFull, RunLayout, sha256_of, write_json
from job.untrusted import MAX_DOCUMENT_BYTES, Doc, is_folder_marker, mask, parse, path_inside, safe_relative

MULTIPART_THRESHOLD = 8 * 1024 * 1024


class StorageError(Exception):
    """The bucket is unreachable, missing, or access is denied; the message says which and what to check."""


STORAGE_ERRORS = (ClientError, BotoCoreError, Boto3Error)


def make_client(
    endpoint_url: str | None = None,
    addressing_style: str = "auto",
    checksums: str = "when_required",
    max_attempts: int = 5,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 20.0,
) -> Any:
    """A boto3 S3 client that works with AWS and with other S3-compatible servers.

    Since boto3 1.36 the default is to send CRC checksums on every upload and demand them on downloads, which
    several non-AWS servers reject; "when_required" restores the behaviour they accept.
    """
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        s3={"addressing_style": addressing_style},
        request_checksum_calculation=checksums,
        response_checksum_validation=checksums,
    )
    return boto3.client("s3", endpoint_url=endpoint_url or None, config=config)


def http_status(error: Exception) -> int | None:
    """The HTTP status of a failed S3 request (None when it never got an answer)."""
    response = getattr(error, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def describe_error(error: Exception, bucket: str) -> str:
    """One line on a failed S3 request, naming the bucket and what to fix where that is known."""
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = http_status(error)
        if code in ("404", "NoSuchBucket"):
            return f"bucket {bucket!r} does not exist (create it or fix VAT_S3_BUCKET)"
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return f"access to bucket {bucket!r} denied ({code}): check the credentials (AWS_ACCESS_KEY_ID, ...)"
        return f"bucket {bucket!r}: {code or status}: {error}"
    if isinstance(error, Boto3Error):  # S3UploadFailedError and friends wrap the ClientError's text
        text = str(error)
        if "NoSuchBucket" in text:
            return f"bucket {bucket!r} does not exist (any more): {text}"
        return f"bucket {bucket!r}: {text}"
    if isinstance(error, NoCredentialsError):
        return (
            "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or a role) "
            "in the environment; boto3 reads them, not VAT_* settings"
        )
    # botocore's text names the URL it tried ("Could not connect to the endpoint URL: ..."), masked like all text
    return mask(
        f"object storage unreachable ({type(error).__name__}: {error}): check AWS_ENDPOINT_URL_S3 / "
        "AWS_ENDPOINT_URL / VAT_S3_ENDPOINT_URL"
    )


def runs_root(prefix: str) -> str:
    """The key prefix under which every run has its folder."""
    return f"{prefix}/runs/" if prefix else "runs/"


@dataclass
class RunStore:
    """One run's objects in the bucket."""

    client: Any
    bucket: str
    prefix: str
    run_id: str
    conditional_writes: bool | None = None  # known after preflight

    @property
    def run_prefix(self) -> str:
        return f"{runs_root(self.prefix)}{self.run_id}/"

    def key(self, relative: str) -> str:
        return self.run_prefix + relative

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except STORAGE_ERRORS as error:
            raise StorageError(describe_error(error, self.bucket)) from None

    def preflight(self) -> bool:
        """Cheap check before any training: the bucket exists and we may write to it. Returns whether the server
        honours conditional writes (`If-None-Match: *` on an existing key is refused), which the run lease needs."""
        self._call(self.client.head_bucket, Bucket=self.bucket)
        probe = self.key(".preflight")
        self._call(self.client.put_object, Bucket=self.bucket, Key=probe, Body=b"ok")
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"again", IfNoneMatch="*")
            conditional = False  # written over: the server ignored the condition (s3rver, old MinIO...)
        except STORAGE_ERRORS as error:
            status = http_status(error)
            if status not in (400, 409, 412, 501):  # 400/501: the header is not implemented
                raise StorageError(describe_error(error, self.bucket)) from None
            conditional = status in (409, 412)
        self._call(self.client.delete_object, Bucket=self.bucket, Key=probe)
        self.conditional_writes = conditional
        return conditional

    def upload(self, path: Path, relative: str, sha256: str | None = None) -> None:
        """Upload one file (multipart above 8 MiB) and check that the stored size and recorded sha256 match."""
        sha256 = sha256 or sha256_of(path)
        self._call(
            self.client.upload_file,
            str(path),
            self.bucket,
            self.key(relative),
            ExtraArgs={"Metadata": {"sha256": sha256}},
            # In the main thread: a signal then ends the wait (job.stop), where worker threads would keep it going.
            Config=TransferConfig(
                multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD, use_threads=False
            ),
        )
        size, stored_sha256 = self.stored(relative)
        if size != path.stat().st_size or stored_sha256 != sha256:
            raise StorageError(f"upload of {relative} did not arrive intact (size or sha256 differs)")

    def delete(self, relative: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=self.key(relative))

    def stored(self, relative: str) -> tuple[int, str | None]:
        """Size and the sha256 recorded at upload of one object."""
        head = self._call(self.client.head_object, Bucket=self.bucket, Key=self.key(relative))
        return head["ContentLength"], head.get("Metadata", {}).get("sha256")

    def remote_objects(self) -> dict[str, int]:
        """relative path -> size, for every object of this run."""
        found: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=self.run_prefix)))
        for page in pages:
            for item in page.get("Contents", []):
                found[item["Key"][len(self.run_prefix) :]] = item["Size"]
        return found

    def upload_run(
        self,
        layout: RunLayout,
        on_event: Callable[..., None] = lambda event, **kw: None,
        stale: Callable[[str], bool] = lambda relative: False,
    ) -> dict:
        """Upload what the bucket lacks, delete the bucket's `stale` objects the run folder no longer holds (older
        checkpoints an earlier attempt left), then write and upload manifest.json last; return the manifest."""
        remote = self.remote_objects()
        files = {}
        for path in sorted(local_files(layout)):
            relative = path.relative_to(layout.root).as_posix()
            size, sha = path.stat().st_size, sha256_of(path)
            files[relative] = {"size": size, "sha256": sha}
            if remote.get(relative) == size and self.stored(relative) == (size, sha):
                continue  # already there, intact (uploaded as training went, or by an earlier attempt)
            self.upload(path, relative, sha)
            on_event("uploaded", file=relative, bytes=size)
        for relative in sorted(r for r in remote if r not in files and stale(r)):
            self.delete(relative)
            on_event("stale_object_deleted", file=relative)
        manifest = {"run_id": self.run_id, "files": files}
        write_json(layout.manifest, manifest)
        self.upload(layout.manifest, MANIFEST)
        return manifest

    def fetch_document(self, relative: str, schema: type[Doc]) -> Doc:
        """One of the run's JSON documents, read through its schema (raises job.untrusted.Untrusted)."""
        response = self._call(self.client.get_object, Bucket=self.bucket, Key=self.key(relative))
        body = self._call(response["Body"].read, MAX_DOCUMENT_BYTES + 1)
        return parse(body, schema, relative)

    def download(
        self,
        destination: Path,
        only: Callable[[str], bool] = lambda relative: True,
        on_problem: Callable[..., None] = lambda event, **kw: None,
        require_sha256: bool = True,
    ) -> list[str]:
        """Fetch this run's objects into `destination`, skipping files already there; return what was fetched.

        A key that is not a plain relative path, or an object whose bytes do not match the sha256 recorded at
        upload (or that has none, with `require_sha256`), is reported through `on_problem` and not written."""
        fetched = []
        for relative, size in self.remote_objects().items():
            if not only(relative):
                continue
            if is_folder_marker(relative, size):
                on_problem("folder_marker_skipped", key=self.key(relative), reason="a folder marker, not a file")
                continue
            target = path_inside(destination, relative)
            if target is None:
                on_problem("object_skipped", key=self.key(relative), reason="not a plain relative path")
                continue
            if target.is_file() and target.stat().st_size == size:
                continue
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:  # e.g. "a" and "a/b" both in the bucket
                on_problem("object_skipped", key=self.key(relative), reason=f"cannot create its folder: {error}")
                continue
            partial = target.with_name(f".{target.name}.part")
            try:
                problem = self._fetch_verified(relative, partial, require_sha256)
            except BaseException:  # a full disk, a lost server, a signal: no .part is left behind
                partial.unlink(missing_ok=True)
                raise
            if problem:
                partial.unlink(missing_ok=True)
                on_problem("object_not_verified", key=self.key(relative), reason=problem)
                continue
            os.replace(partial, target)
            fetched.append(relative)
        return fetched

    def _fetch_verified(self, relative: str, partial: Path, require_sha256: bool) -> str | None:
        """Stream one object to `partial`; a reason when its bytes do not match its recorded sha256, else None."""
        response = self._call(self.client.get_object, Bucket=self.bucket, Key=self.key(relative))
        recorded = response.get("Metadata", {}).get("sha256")
        if recorded is None and require_sha256:
            response["Body"].close()
            return "no sha256 recorded at upload"
        digest = hashlib.sha256()
        try:
            with partial.open("wb") as out:
                for chunk in response["Body"].iter_chunks(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except STORAGE_ERRORS as error:
            raise StorageError(describe_error(error, self.bucket)) from None
        except OSError as error:
            if error.errno in NO_SPACE:
                raise DiskFull(f"no space left to download {relative} into {partial.parent}") from None
            raise
        if recorded is not None and digest.hexdigest() != recorded:
            return f"sha256 {digest.hexdigest()[:12]}... differs from the one recorded at upload ({recorded[:12]}...)"
        return None


def local_files(layout: RunLayout) -> Iterator[Path]:
    """Every artifact of the run folder except the manifest and temporary files."""
    for path in layout.root.rglob("*"):
        if path.is_file() and path.name != MANIFEST and not path.name.startswith("."):
            yield path


def list_run_ids(client: Any, bucket: str, prefix: str) -> list[str]:
    root = runs_root(prefix)
    paginator = client.get_paginator("list_objects_v2")
    ids = []
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=root, Delimiter="/"):
            ids += [p["Prefix"][len(root) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
    except STORAGE_ERRORS as error:
        raise StorageError(describe_error(error, bucket)) from None
    return sorted(i for i in ids if safe_relative(i) is not None)


def client_from_settings(settings: Any) -> Any:
    return make_client(
        settings.s3_endpoint_url,
        settings.s3_addressing_style,
        settings.s3_checksums,
        settings.s3_max_attempts,
        settings.s3_connect_timeout_s,
        settings.s3_read_timeout_s,
    )


def open_run_store(settings: Any) -> RunStore:
    """The run's store from the settings, checked with a preflight (raises StorageError)."""
    store = RunStore(client_from_settings(settings), settings.s3_bucket, settings.s3_prefix, settings.run_id)
    store.preflight()
    return store
