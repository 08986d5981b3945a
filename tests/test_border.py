"""Issue 22: the border (job/untrusted.py) under generated input. Every outside name, URL and JSON document goes
through these functions, so their properties are checked on thousands of hostile values, not on a few examples."""

import io
import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job import untrusted
from job.untrusted import (
    HistoryEvent,
    Lease,
    Manifest,
    Pointer,
    Report,
    Untrusted,
    checked_url,
    mask,
    parse,
    path_inside,
    register_secret,
)

# Names built from what path tricks are made of: separators, dots, drive-like and control characters.
PATHISH = st.lists(st.sampled_from(list("ab./\\:~\x00\x1f\n -_") + ["..", "/..", "%2e"]), max_size=20).map("".join)
PLAIN_SEGMENT = st.text(alphabet=st.sampled_from(list("abcXYZ019-_")), min_size=1, max_size=8)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(name=st.one_of(PATHISH, st.text(max_size=40)))
def test_path_inside_never_leaves_its_folder(tmp_path, name):
    folder = tmp_path / "dl"
    folder.mkdir(exist_ok=True)
    target = path_inside(folder, name)
    if target is not None:
        resolved = target.resolve()
        assert resolved.is_relative_to(folder.resolve()) and resolved != folder.resolve()
        assert not any(part.startswith(".") for part in Path(name).parts), "hidden names are the job's own"


@SETTINGS
@given(parts=st.lists(PLAIN_SEGMENT, min_size=1, max_size=4))
def test_path_inside_accepts_every_plain_relative_name(tmp_path, parts):
    name = "/".join(parts)
    assert path_inside(tmp_path, name) == tmp_path / name


def test_path_inside_refuses_a_symbolic_link_that_points_away(tmp_path):
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "link").symlink_to(tmp_path)
    assert path_inside(tmp_path / "dl", "link/escaped.txt") is None
    assert path_inside(tmp_path / "dl", "/etc/passwd") is None and path_inside(tmp_path / "dl", "/../x") is None


# Userinfo characters as RFC 3986 allows them (and "@", which real passwords hold and break naive masking).
USERINFO_CHARS = st.sampled_from(list("abcdefXYZ0123456789-._~!$&'()+,;=:%@"))
SECRET = st.text(alphabet=st.sampled_from(list("abcdefXYZ0123456789-_~!$&'()+,;=@")), min_size=6, max_size=24)


@SETTINGS
@given(
    user=st.text(alphabet=USERINFO_CHARS, max_size=10),
    secret=SECRET,
    before=st.text(max_size=30),
    after=st.sampled_from(["/", "/x.gz", ":9000/", "?a=1", "#f", " and more", "'", ""]),
    scheme=st.sampled_from(["http", "https", "s3", "ftp"]),
)
def test_mask_removes_the_userinfo_of_anything_url_shaped(user, secret, before, after, scheme):
    secret = secret.strip("@") or "s3cr3t!"
    text = f"{before} {scheme}://{user}:{secret}@host.example{after}"
    masked = mask(text)
    assert f":{secret}@" not in masked
    assert "***@host.example" in masked


@SETTINGS
@given(secret=SECRET, around=st.lists(st.text(max_size=20), min_size=1, max_size=4))
def test_a_registered_secret_is_masked_wherever_it_appears(secret, around):
    register_secret(secret)
    text = secret.join(around) + secret
    nested = {"k": [text, (text,)], text: 1}
    assert secret not in mask(text)
    assert secret not in json.dumps(mask(nested))


@SETTINGS
@given(value=st.one_of(st.text(max_size=60), PATHISH, st.from_regex(r"[a-z]{2,6}://[^\s]{0,30}", fullmatch=True)))
def test_checked_url_accepts_only_http_urls_with_a_host_and_never_echoes_a_password(value):
    try:
        assert checked_url(value) == value
    except ValueError as error:
        message = str(error)
        password = value.partition("://")[2].rpartition("@")[0].partition(":")[2]
        if len(password) >= untrusted.MIN_SECRET_LENGTH and "@" in value:
            assert f":{password}@" not in message
        return
    assert value.lower().startswith(("http://", "https://"))


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1:5055", "user:secret@127.0.0.1:9", "http://h:99999/", "http:///path", "file:///etc/passwd", ""],
)
def test_checked_url_refuses(value):
    with pytest.raises(ValueError):
        checked_url(value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
METRICS = {"accuracy": 0.99, "macro_f1": 0.98}
GOOD = {
    Report: {
        "run_id": "r1",
        "created_at": "2026-11-30T02:00:00+00:00",
        "settings": {"run_group": "g", "label_split_seed": 1, "mnist_mirrors": ["https://m/"]},
        "models": {m: {"seeded_test": METRICS, "mnist_test": METRICS} for m in ("baseline", "vat")},
    },
    Manifest: {"run_id": "r1", "files": {"vat/model.pt": {"size": 3, "sha256": "a" * 64}}},
    Pointer: {
        "run_id": "r1",
        "metric": "vat.mnist_test.accuracy",
        "accuracy": 0.99,
        "files": {
            n: {"key": "p/latest/runs/r1/" + n, "size": 3, "sha256": "b" * 64} for n in ("model.pt", "report.json")
        },
    },
    Lease: {"host": "node-a", "pid": 7, "token": "t", "lease_s": 120.0},
    HistoryEvent: {
        "verdict": "refused",
        "run_id": "r2",
        "group": "g",
        "at": "2026-11-30T02:00:00+00:00",
        "metric": "vat.seeded_test.accuracy",
        "candidate": 0.97,
        "test_accuracy": 0.96,
        "promoted": 0.99,
        "promoted_run_id": "r1",
        "min_accuracy": 0.95,
        "drift_floor": 0.98,
        "reason": "accuracy 0.9700 is more than 0.0050 below the promoted model's 0.9900",
    },
}


def _mutations(document):
    """The document with one field at a time replaced by a hostile value (recursively)."""
    hostile = [None, "x", -1, 1e308, [], {}, "NaN", True, "../../etc", "z" * 300]
    if isinstance(document, dict):
        for key, value in document.items():
            for bad in hostile:
                yield {**document, key: bad}
            for inner in _mutations(value):
                yield {**document, key: inner}
            yield {k: v for k, v in document.items() if k != key}


@pytest.mark.parametrize("schema", list(GOOD), ids=lambda s: s.__name__)
def test_every_schema_reads_its_own_documents_and_every_mutation_is_a_document_or_an_untrusted(schema):
    assert parse(json.dumps(GOOD[schema]), schema, "doc") is not None
    for mutated in _mutations(GOOD[schema]):
        try:
            parse(json.dumps(mutated), schema, "doc")
        except Untrusted as error:
            assert "\n" not in str(error) and str(error).startswith("doc")


@SETTINGS
@given(value=JSON, schema=st.sampled_from(list(GOOD)))
def test_arbitrary_json_is_a_document_or_an_untrusted_never_a_crash(value, schema):
    try:
        body = json.dumps(value)
    except ValueError:
        return
    try:
        parse(body, schema, "doc")
    except Untrusted:
        pass


@SETTINGS
@given(body=st.binary(max_size=200), schema=st.sampled_from(list(GOOD)))
def test_arbitrary_bytes_are_a_document_or_an_untrusted(body, schema):
    try:
        parse(body, schema, "doc")
    except Untrusted:
        pass


def test_json_nested_100000_deep_and_non_finite_numbers_are_refused_in_one_line():
    deep = "[" * 100_000 + "]" * 100_000
    for schema in GOOD:
        with pytest.raises(Untrusted, match="not valid JSON"):
            parse(deep, schema, "doc")
    nan = json.loads(json.dumps(GOOD[Pointer]))
    for bad in ("NaN", "Infinity", '"0.99"', "1.5"):
        body = json.dumps(nan).replace('"accuracy": 0.99', f'"accuracy": {bad}')
        with pytest.raises(Untrusted, match="accuracy"):
            parse(body, Pointer, "pointer.json")
    with pytest.raises(Untrusted, match="larger than"):
        parse(b" " * (untrusted.MAX_DOCUMENT_BYTES + 1), Lease, "lease")


def test_a_pointer_must_name_both_files_and_a_report_its_models():
    empty = {**GOOD[Pointer], "files": {}}
    with pytest.raises(Untrusted, match="files"):
        parse(json.dumps(empty), Pointer, "pointer.json")
    for shape in ({"models": []}, {"settings": [1]}, {"created_at": 1}, {"created_at": "zzzz"}):
        with pytest.raises(Untrusted):
            parse(json.dumps({**GOOD[Report], **shape}), Report, "report.json")


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_traceback_that_quotes_a_secret_is_masked_in_both_log_formats(log_format):
    from job import logs

    register_secret("tr4ceback-secret")
    stream = io.StringIO()
    logs.configure_logging(log_format, "info", stream=stream)
    try:
        raise ValueError("nonnumeric port: 'tr4ceback-secret@127.0.0.1' from https://u:p4ss-word-9@h/")
    except ValueError:
        logs.get_logger().exception("internal_error")
    logs.configure_logging("json", "info")
    text = stream.getvalue()
    assert "internal_error" in text and "ValueError" in text
    assert "tr4ceback-secret" not in text and "p4ss-word-9" not in text


def test_an_uncaught_exception_prints_a_masked_traceback():
    import subprocess
    import sys

    code = (
        "from job import logs; from job.untrusted import register_secret; register_secret('uncaught-s3cret'); "
        "logs.configure_logging('json', 'info'); raise RuntimeError('https://u:uncaught-s3cret@h/ failed')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 1 and "RuntimeError" in result.stderr
    assert "uncaught-s3cret" not in result.stderr + result.stdout


# --- the exact rules, example by example: the properties above hold for a laxer border too (a backslash or a
# trailing "/" cannot leave the folder on Linux), so what the border refuses and accepts is pinned here as well.


@pytest.mark.parametrize("name", ["a", "a/b.txt", "vat/model.pt", "a b", "x~y..z", "-a/_b"])
def test_safe_relative_accepts_plain_names(name):
    assert untrusted.safe_relative(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "x/", "/abs", "a\\b", "a//b", ".", "..", "a/../b", "a/.hidden", ".tmp-x", "a\x00b", "a\x1fb", "a\x7fb", 123],
)
def test_safe_relative_refuses(name):
    assert untrusted.safe_relative(name) is None


def test_a_folder_marker_is_an_empty_object_whose_key_ends_in_a_slash():
    assert untrusted.is_folder_marker("runs/", 0) and untrusted.is_folder_marker("", 0)
    assert not untrusted.is_folder_marker("runs/", 1) and not untrusted.is_folder_marker("runs", 0)


def test_the_longest_registered_secret_is_masked_first_so_no_part_of_it_survives():
    register_secret("Akx9-wrapped-qz")
    register_secret("wrapped-qz")
    assert mask("Akx9-wrapped-qz") == "***" and mask("[wrapped-qz]") == "[***]"


def test_secrets_of_minimum_length_and_their_percent_encoded_form_are_masked():
    shortest = "\u00a7" * untrusted.MIN_SECRET_LENGTH
    register_secret(shortest)
    assert mask(f"key {shortest}.") == "key ***."
    register_secret("qw:e/r@t")
    assert mask("x qw%3Ae%2Fr%40t y") == "x *** y"
    register_secret("ab")  # shorter than MIN_SECRET_LENGTH: an ordinary word would vanish from every line
    assert mask("ab") == "ab"


@pytest.mark.parametrize(
    ("url", "userinfo"),
    [
        ("https://u:pw@h/", "u:pw"),
        ("HTTPS://Us:Pw1@h:9/x", "Us:Pw1"),
        ("u:pw@127.0.0.1:9", "u:pw"),
        ("https://u:p@ss@h/", "u:p@ss"),
        ("https://h/x/a@b/c", ""),
        ("https://h/", ""),
    ],
)
def test_the_userinfo_of_a_url_is_what_sits_before_the_last_at_of_its_authority(url, userinfo):
    assert untrusted._userinfo(url) == userinfo


def test_the_environment_registers_url_passwords_and_aws_secrets_even_where_quoted_without_their_url():
    values = {
        "VAT_S3_ENDPOINT_URL": "http://user:envpw:with-colon@127.0.0.1:9000",
        "VAT_MNIST_MIRRORS": "https://a:mirror-pw-1@m1/,https://b:mirror%40pw-2@m2/",
        "AWS_ENDPOINT_URL": "http://k:boto-pw-3@x/",
        "AWS_ENDPOINT_URL_S3": "http://k:boto-s3-pw-6@y/",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-4",
        "AWS_SESSION_TOKEN": "session-token-5",
    }
    untrusted.register_environment_secrets(values, ["VAT_S3_ENDPOINT_URL", "VAT_MNIST_MIRRORS"])
    # as urllib and botocore quote them: "nonnumeric port: 'password@host'", a bare key in an error
    line = "'envpw:with-colon@127.0.0.1' 'mirror-pw-1@m1' mirror@pw-2 'boto-pw-3@x' boto-s3-pw-6 aws-secret-4"
    assert mask(line + " session-token-5") == "'***@127.0.0.1' '***@m1' *** '***@x' *** *** ***"


def test_a_url_registers_its_token_its_password_and_the_password_unquoted():
    untrusted.register_url_secrets("https://ghp-token-6@h/")
    untrusted.register_url_secrets("https://u:p%40ss:word-7@h/")
    assert mask("ghp-token-6@h") == "***@h"
    assert mask("p%40ss:word-7 p@ss:word-7") == "*** ***"


@pytest.mark.parametrize(
    ("url", "bare", "user", "password"),
    [
        ("https://u:p%40w:x@h:9/p?q=1#f", "https://h:9/p?q=1#f", "u", "p@w:x"),
        ("http://tok%2Fen@h/", "http://h/", "tok/en", None),
        ("http://u:pw@[::1]:9000/m/", "http://[::1]:9000/m/", "u", "pw"),
        ("https://h:9/p", "https://h:9/p", None, None),
    ],
)
def test_without_userinfo_splits_the_credentials_off_unquoted(url, bare, user, password):
    assert untrusted.without_userinfo(url) == (bare, user, password)


@pytest.mark.parametrize("url", ["http://h:1/", "https://h:65535/", "http://u:abc@h:9000/", "HTTP://H/"])
def test_checked_url_accepts_the_edges(url):
    assert checked_url(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("   ", "must be a URL such as https://host:port/"),
        ("http://h:port/", "has no valid port (a number from 1 to 65535)"),
        ("http://h:65536/", "has no valid port (a number from 1 to 65535)"),
        ("ftp://h/", "must start with http:// or https:// and name a host (e.g. http://host:port/)"),
        ("http://:9000/", "names no host, or holds spaces"),
        ("http://ho st/", "names no host, or holds spaces"),
        ("http://h:0/", "has no valid port (a number from 1 to 65535)"),
        ("http://[::1:9000/", "has a bad [IPv6] host; write it as http://[::1]:9000/"),
        ("http://[not-an-ip]/", "has a bad [IPv6] host; write it as http://[::1]:9000/"),
        ("http://[::1]:x/", "has no valid port (a number from 1 to 65535)"),
        ("http://u:ab@h/", "a password this short cannot be kept out of the logs"),
    ],
)
def test_checked_url_says_what_is_wrong(url, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        checked_url(url)
    assert str(error.value).startswith(message if not url.strip() else repr(mask(url)))


def test_checked_url_shows_the_url_with_its_password_masked():
    with pytest.raises(ValueError) as error:
        checked_url("http://u:show-me-not@h:port/")
    assert str(error.value) == "'http://***@h:port/' has no valid port (a number from 1 to 65535)"


def test_checked_url_names_the_one_scheme_it_wants():
    with pytest.raises(ValueError, match=re.escape("must start with s3:// and name a host (e.g. s3://host:port/)")):
        checked_url("http://h/", schemes=("s3",))
    with pytest.raises(ValueError, match=re.escape("has a bad [IPv6] host; write it as s3://[::1]:9000/")):
        checked_url("s3://[::1/", schemes=("s3",))


def test_a_report_needs_a_group_name_and_integer_seeds_only_where_it_has_them():
    assert parse(json.dumps(GOOD[Report]), Report, "r").settings["run_group"] == "g"
    without_group = {**GOOD[Report], "settings": {"label_split_seed": 1}}
    assert parse(json.dumps(without_group), Report, "r").settings == {"label_split_seed": 1}
    for group in ("Nightly-A.1_b", "g" * 63):
        named = {**GOOD[Report], "settings": {"run_group": group}}
        assert parse(json.dumps(named), Report, "r").settings["run_group"] == group
    for settings_, message in [
        ({"run_group": "../up"}, "run_group is not a group name"),
        ({"run_group": "ok/../x"}, "run_group is not a group name"),
        ({"run_group": "g" * 64}, "run_group is not a group name"),
        ({"run_group": 3}, "run_group is not a group name"),
        ({"label_split_seed": "1"}, "label_split_seed is not an integer"),
        ({"seed": 1.0}, "seed is not an integer"),
        ({"train_steps": True}, "train_steps is not an integer"),
    ]:
        with pytest.raises(Untrusted, match=re.escape(f"report.json: settings: Value error, {message}")):
            parse(json.dumps({**GOOD[Report], "settings": settings_}), Report, "report.json")


def test_parse_names_where_a_document_is_wrong_and_takes_exactly_its_size_limit():
    bad = json.loads(json.dumps(GOOD[Report]))
    bad["models"]["vat"]["mnist_test"]["accuracy"] = 2
    with pytest.raises(Untrusted, match=r"^r: models\.vat\.mnist_test\.accuracy: Input should be less than or"):
        parse(json.dumps(bad), Report, "r")
    with pytest.raises(Untrusted, match=r"^lease: the document: Input should be an object$"):
        parse("[]", Lease, "lease")
    manifest = {"run_id": "r1", "files": {"../x": {"size": 1, "sha256": "a" * 64}}}
    plain = re.escape("manifest.json: files.../x.[key]: Value error, is not a plain relative file name")
    with pytest.raises(Untrusted, match=f"^{plain}$"):
        parse(json.dumps(manifest), Manifest, "manifest.json")
    body = json.dumps(GOOD[Lease])
    exactly = body + " " * (untrusted.MAX_DOCUMENT_BYTES - len(body))
    assert parse(exactly, Lease, "lease").pid == 7
    with pytest.raises(Untrusted, match=f"^lease is larger than {untrusted.MAX_DOCUMENT_BYTES // 2**20} MiB$"):
        parse(exactly + " ", Lease, "lease")
