"""``open_store(url)``: the one setting that chooses and configures the object store.

Accepted forms::

    /abs/path  or  rel/path                      local directory (relative to the cwd)
    file:///abs/path  or  file://./rel/path      local directory
    s3://[ACCESS:SECRET@]host[:port]/bucket[?secure=true|false&region=R&create_bucket=true|false]

S3 credentials missing from the URL come from ``FLASHCROWD_S3_ACCESS_KEY``/``FLASHCROWD_S3_SECRET_KEY``,
else ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``. Percent-encode ``/``, ``:``, ``@`` etc. in
credentials placed in the URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from services.storage.base import ObjectStore
from services.storage.local import LocalObjectStore
from services.storage.s3 import MinioObjectStore

#: Embedded-mode default: ``./var/store`` under the working directory.
DEFAULT_STORE_URL = "file://./var/store"

_FILE_FORMS = "file:///absolute/path, file://./relative/path or a plain path"
_S3_FORM = (
    "s3://[ACCESS:SECRET@]host[:port]/bucket[?secure=true|false&region=REGION&create_bucket=true|false]"
)
_CREDENTIAL_ENV = (
    ("FLASHCROWD_S3_ACCESS_KEY", "FLASHCROWD_S3_SECRET_KEY"),
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
)
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def open_store(url: str, *, env: Mapping[str, str] | None = None) -> ObjectStore:
    """Open the store ``url`` names; ``env`` (default ``os.environ``) supplies S3 credentials.

    Raise ``ValueError`` naming the expected forms when ``url`` is not one of them.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"empty object store URL; expected {_FILE_FORMS}, or {_S3_FORM}")
    url = url.strip()
    if "://" not in url:
        return LocalObjectStore(Path(url))
    scheme = url.split("://", 1)[0].lower()
    if scheme == "file":
        return LocalObjectStore(_file_path(url))
    if scheme == "s3":
        return _open_s3(url, os.environ if env is None else env)
    raise ValueError(
        f"unsupported object store URL scheme {scheme!r} in {_redact(url)!r}; expected "
        f"{_FILE_FORMS}, or {_S3_FORM}"
    )


def local_path(url: str) -> Path | None:
    """The directory a local store URL names (a path or ``file://``), None for other stores."""
    url = url.strip()
    if "://" not in url:
        return Path(url).expanduser()
    return _file_path(url) if url.split("://", 1)[0].lower() == "file" else None


def _file_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"file store URL {url!r} must not have a query or fragment; expected {_FILE_FORMS}")
    path = unquote(parts.path)
    if parts.netloc in ("", "localhost"):
        if not path.startswith("/"):
            raise ValueError(f"file store URL {url!r} has no path; expected {_FILE_FORMS}")
        return Path(path)
    # file://./var/store and file://../x: the "host" is really the start of a relative path.
    if parts.netloc in (".", ".."):
        return Path(parts.netloc + path)
    raise ValueError(
        f"file store URL {url!r} names host {parts.netloc!r}; expected {_FILE_FORMS} "
        f"(use three slashes for an absolute path)"
    )


def _flag(name: str, value: str, url: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} in {_redact(url)!r} must be true or false")


def _open_s3(url: str, env: Mapping[str, str]) -> MinioObjectStore:
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # non-numeric port
        raise ValueError(f"invalid S3 store URL {_redact(url)!r} ({exc}); expected {_S3_FORM}") from None
    if not host:
        raise ValueError(f"S3 store URL {_redact(url)!r} has no host; expected {_S3_FORM}")
    bucket = parts.path.strip("/")
    if not bucket or "/" in bucket:
        raise ValueError(f"S3 store URL {_redact(url)!r} must name exactly one bucket; expected {_S3_FORM}")
    if parts.fragment:
        raise ValueError(f"S3 store URL {_redact(url)!r} must not have a fragment; expected {_S3_FORM}")

    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError(f"malformed query in S3 store URL {_redact(url)!r}; expected {_S3_FORM}") from None
    unknown = set(query) - {"secure", "region", "create_bucket"}
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} in {_redact(url)!r}; expected {_S3_FORM}")
    if any(len(values) > 1 for values in query.values()):
        raise ValueError(f"repeated parameter in {_redact(url)!r}; expected {_S3_FORM}")
    options = {name: values[0] for name, values in query.items()}
    secure = _flag("secure", options.get("secure", "false"), url)
    create_bucket = _flag("create_bucket", options.get("create_bucket", "true"), url)
    region = options.get("region", "us-east-1")
    if not region:
        raise ValueError(f"empty region in {_redact(url)!r}")

    access_key, secret_key = _credentials(parts.username, parts.password, env, url)
    # IPv6 literals need their brackets back in host:port form.
    endpoint = f"[{host}]" if ":" in host else host
    if port is not None:
        endpoint += f":{port}"
    return MinioObjectStore(
        endpoint,
        access_key,
        secret_key,
        bucket,
        secure=secure,
        region=region,
        create_bucket=create_bucket,
    )


def _credentials(user: str | None, password: str | None, env: Mapping[str, str], url: str) -> tuple[str, str]:
    if user is not None or password is not None:
        if not user or not password:
            raise ValueError(
                f"S3 store URL {_redact(url)!r} must give both ACCESS and SECRET (ACCESS:SECRET@host)"
            )
        return unquote(user), unquote(password)
    # A pair is taken from one source only: mixing an access key with another source's secret never works.
    for access_var, secret_var in _CREDENTIAL_ENV:
        access, secret = env.get(access_var), env.get(secret_var)
        if access and secret:
            return access, secret
    names = ", ".join(f"{a}/{s}" for a, s in _CREDENTIAL_ENV)
    raise ValueError(f"no S3 credentials for {_redact(url)!r}: put ACCESS:SECRET@ in the URL or set {names}")


def _redact(url: str) -> str:
    """The URL with any secret replaced, safe for error messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    # Last "@": an unencoded "/" or "@" inside the secret must not make us print it.
    userinfo, _, hostpart = rest.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}"
