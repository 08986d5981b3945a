"""The border: every value that comes from outside the job's code is checked here before anything uses it.

Three kinds of outside value, one way in for each:
- a name that will become a local path (an object key, a file name in a pointer, a run group in a file name):
  `path_inside(folder, name)` is the only way to turn it into a path;
- anything URL-shaped (settings, mirrors, endpoints, and every message or traceback that may quote one):
  `checked_url` validates a URL setting, `mask` hides credentials in any text before it is printed or stored;
- a JSON document read back from the bucket (report, manifest, promotion pointer and history, run lease):
  `parse` reads it with a size and a nesting bound into one of the schemas below, or raises `Untrusted`.

What a document does not pass is never half used: the caller gets a schema object whose fields have the types
and ranges written here, or an `Untrusted` naming the document and the first field that is wrong (never the
value: it may be garbage megabytes long, or a planted secret).
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from job.runid import RUN_ID_PATTERN

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024  # a report.json is about 10 kB; a pointer or lease well under 1 kB
MAX_DRIFT_WINDOW = 365  # promoted models a pointer remembers for the drift bound (VAT_PROMOTE_DRIFT_WINDOW)


class Untrusted(ValueError):
    """An outside value failed its check; the message is one line and never contains the value itself."""


# --- names that become paths --------------------------------------------------------------------------------


def safe_relative(name: str) -> str | None:
    """`name` if it may name a file under a local folder, else None.

    Refused: "" and folder markers ("x/"), absolute paths, "." / ".." / empty segments ("a//b"), backslashes,
    NUL and control characters, and hidden names (".x": the job's own temporary and lock files)."""
    if not isinstance(name, str) or "\\" in name:
        return None
    for part in name.split("/"):  # "" and "x/" have an empty segment
        if not part or part.startswith(".") or any(ord(c) < 32 or c == "\x7f" for c in part):
            return None
    return name


def path_inside(folder: Path, name: str) -> Path | None:
    """The local path of an outside `name` under `folder`, or None when it is not a plain relative name or would
    resolve outside `folder` (through a symbolic link already there, too)."""
    if safe_relative(name) is None:
        return None
    target = folder / name
    root = folder.resolve()
    resolved = target.resolve()
    return target if resolved.is_relative_to(root) and resolved != root else None


def is_folder_marker(name: str, size: int) -> bool:
    """An empty object whose key ends in "/": what S3 consoles' "Create folder" makes. Not a file, not a threat."""
    return size == 0 and (name == "" or name.endswith("/"))


# --- URLs and secrets ---------------------------------------------------------------------------------------

# userinfo of anything URL-shaped: after "//", up to the LAST "@" before the path (a password may hold "@").
_URL_USERINFO = re.compile(r"(?<=//)[^/\s?#]*@")
_registered: set[str] = set()
MIN_SECRET_LENGTH = 3  # shorter "secrets" would mask ordinary words; such URLs are refused by checked_url


def register_secret(secret: str | None) -> None:
    """From now on, `mask` hides `secret` wherever it appears, URL-shaped or not (urllib's "nonnumeric port:
    'password@host'" quotes a password without its "//")."""
    if secret and len(secret) >= MIN_SECRET_LENGTH:
        _registered.add(secret)
        _registered.add(urllib.parse.quote(secret, safe=""))


SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
BOTO3_ENDPOINTS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def register_environment_secrets(values: dict[str, str | None], url_variables: list[str]) -> None:
    """Before anything can fail: the credentials in URL-valued variables (a JSON list or commas too) and the AWS
    secrets are masked in every message from now on, even where a library quotes them without their URL."""
    for name in (*url_variables, *BOTO3_ENDPOINTS):
        for url in re.split(r"[\s,\[\]\"]+", values.get(name) or ""):
            register_url_secrets(url)
    for name in SECRET_VARIABLES:
        register_secret(values.get(name))


def register_url_secrets(url: str) -> None:
    """Register the userinfo of `url` (user:password, or a token) and its password alone as secrets."""
    userinfo = _userinfo(url)
    if userinfo:
        register_secret(userinfo)
        register_secret(userinfo.partition(":")[2])
        register_secret(urllib.parse.unquote(userinfo.partition(":")[2]))


def _userinfo(url: str) -> str:
    """The user:password part of a URL, with or without its scheme ("user:pw@host:9" is a common mistake)."""
    authority = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", url.strip()).split("/", 1)[0]
    return authority.rpartition("@")[0]


def mask(value: Any) -> Any:
    """`value` with URL credentials and registered secrets replaced by ***, in strings and inside lists, tuples and
    dicts (keys too). Every log line, error message, traceback and report passes through this."""
    if isinstance(value, str):
        text = _URL_USERINFO.sub("***@", value)
        for secret in sorted(_registered, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, "***")
        return text
    if isinstance(value, list | tuple):
        return [mask(item) for item in value]
    if isinstance(value, dict):
        return {mask(key): mask(item) for key, item in value.items()}
    return value


def checked_url(value: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
    """`value` if it is an absolute URL with one of `schemes`, a host and (if any) a numeric port; otherwise
    raise ValueError with a line that says what is wrong and shows the URL masked."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a URL such as https://host:port/")
    shown = mask(value)
    bad_port = f"{shown!r} has no valid port (a number from 1 to 65535)"
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:  # unbalanced brackets, or a bracketed host that is no IP address
        raise ValueError(f"{shown!r} has a bad [IPv6] host; write it as {schemes[0]}://[::1]:9000/") from None
    try:
        port = parts.port
    except ValueError:  # .port refuses a port that is not a number or is above 65535
        raise ValueError(bad_port) from None
    if parts.scheme.lower() not in schemes or not parts.netloc:
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise ValueError(f"{shown!r} must start with {wanted} and name a host (e.g. {schemes[0]}://host:port/)")
    if not parts.hostname or any(c.isspace() for c in value):
        raise ValueError(f"{shown!r} names no host, or holds spaces")
    if port is not None and not 0 < port < 65536:
        raise ValueError(bad_port)
    if parts.password is not None and len(parts.password) < MIN_SECRET_LENGTH:
        raise ValueError(f"{shown!r}: a password this short cannot be kept out of the logs; use a longer one")
    return value


def without_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(url without user:password@, user, password), both unquoted: urllib would take the userinfo for a host."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    bare = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return bare, urllib.parse.unquote(parts.username), password


# --- JSON documents -----------------------------------------------------------------------------------------


Fraction = Annotated[float, Field(ge=0, le=1, strict=True, allow_inf_nan=False)]  # "0.9" is not a number
RunId = Annotated[str, Field(pattern=f"^{RUN_ID_PATTERN.pattern}$", max_length=128)]
Group = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Size = Annotated[int, Field(ge=0, le=2**50)]
RelativeName = Annotated[str, AfterValidator(lambda name: _plain(name))]


def _plain(name: str) -> str:
    if safe_relative(name) is None:
        raise ValueError("is not a plain relative file name")
    return name


class _Document(BaseModel):
    # Documents written by newer versions may carry more fields: ignored, never trusted.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Metrics(_Document):
    accuracy: Fraction
    macro_f1: Fraction


class ModelResult(_Document):
    seeded_test: Metrics
    mnist_test: Metrics


class Models(_Document):
    baseline: ModelResult
    vat: ModelResult


SettingValue = str | bool | int | float | None | list[str | bool | int | float]


def _report_settings(values: dict[str, SettingValue]) -> dict[str, SettingValue]:
    """The settings a report records: every one kept (collect shows and groups by them, as plain JSON values);
    those collect computes with must have their types."""
    group = values.get("run_group")
    if group is not None and not (isinstance(group, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", group)):
        raise ValueError("run_group is not a group name")
    for name in ("label_split_seed", "seed", "train_steps"):
        if values.get(name) is not None and (type(values[name]) is not int):
            raise ValueError(f"{name} is not an integer")
    return values


class Report(_Document):
    """report.json as collect, trend and promotion read it back."""

    run_id: RunId
    group: Group | None = None  # reports before version 2 have none
    created_at: Annotated[AwareDatetime, Field(strict=True)]  # an ISO 8601 string; 1 is not a time
    settings: Annotated[dict[str, SettingValue], AfterValidator(_report_settings)]
    models: Models


class ManifestEntry(_Document):
    size: Size
    sha256: Sha256


class Manifest(_Document):
    run_id: str = Field(max_length=200)  # compared with the run's id by the reader, who names the difference
    files: dict[RelativeName, ManifestEntry]


class PointerFile(ManifestEntry):
    key: str = Field(min_length=1, max_length=1024)


class PointerFiles(_Document):
    model: PointerFile = Field(alias="model.pt")
    report: PointerFile = Field(alias="report.json")

    def named(self) -> dict[str, PointerFile]:
        """File name in the destination folder -> where it is in the bucket (the names are this schema's own)."""
        return {"model.pt": self.model, "report.json": self.report}


class PreviousPromotion(_Document):
    run_id: RunId
    accuracy: Fraction


class Pointer(_Document):
    """pointer.json of a promotion slot (job/promote.py)."""

    run_id: RunId
    group: Group | None = None
    created_at: str | None = Field(default=None, max_length=64)
    promoted_at: str | None = Field(default=None, max_length=64)
    metric: str = Field(max_length=100)  # what `accuracy` (and `recent`) measure; before issue 25: the test set's
    accuracy: Fraction
    test_accuracy: Fraction | None = None  # the official test set's, beside it; never gated on
    files: PointerFiles
    previous: PreviousPromotion | None = None
    recent: list[PreviousPromotion] = Field(default=[], max_length=MAX_DRIFT_WINDOW)  # newest first, itself too


class HistoryEvent(_Document):
    """One verdict of a promotion slot's history (job/history.py): a promotion or a refusal."""

    verdict: Literal["promoted", "refused"]
    run_id: RunId
    group: Group | None = None
    at: Annotated[AwareDatetime, Field(strict=True)]
    metric: str = Field(max_length=100)
    candidate: Fraction
    test_accuracy: Fraction | None = None
    promoted: Fraction | None = None  # the model it was judged against
    promoted_run_id: RunId | None = None
    min_accuracy: Fraction | None = None
    drift_floor: Fraction | None = None
    reason: str = Field(default="", max_length=2000, pattern=r"^[^\x00-\x1f\x7f]*$")  # one line, no escapes


LEASE_MAX_S = 3600.0  # an hour without renewal; longer would lock a run out for a night after a crash


class Lease(_Document):
    """A run's lease object (job/lock.py): who holds it and for how long it lives without renewal."""

    host: str = Field(default="?", max_length=255)
    pid: int | None = Field(default=None, ge=0, le=2**31)
    token: str | None = Field(default=None, max_length=64)
    lease_s: Annotated[float, Field(gt=0, le=LEASE_MAX_S, allow_inf_nan=False)]


Doc = TypeVar("Doc", bound=BaseModel)


def parse(body: bytes | str, schema: type[Doc], what: str) -> Doc:
    """`body` as a `schema` document, or Untrusted("<what> ..."): too large, not JSON (nested too deep
    included), or a field missing, of the wrong type or out of range (its location named, never its value)."""
    if len(body) > MAX_DOCUMENT_BYTES:
        raise Untrusted(f"{what} is larger than {MAX_DOCUMENT_BYTES // 2**20} MiB")
    try:
        return schema.model_validate_json(body)  # pydantic's parser bounds nesting depth (no RecursionError)
    except ValidationError as error:
        first = error.errors(include_url=False, include_input=False)[0]
        if first["type"] == "json_invalid":
            raise Untrusted(f"{what} is not valid JSON (truncated?)") from None
        where = ".".join(str(part) for part in first["loc"]) or "the document"
        raise Untrusted(f"{what}: {where}: {first['msg']}") from None
