"""``MinioObjectStore``: one bucket on MinIO or any S3-protocol server, through the ``minio`` client.

S3 PUTs (single or multipart) become visible only when complete, so single-object writes are atomic
without extra work here.

Failing fast: the client's HTTP pool has short timeouts (connect 2 s, read 10 s) and two retries
(the minio default is no read timeout and five retries, so a hanging store held every call until the
caller's deadline); a store that is down, hangs or answers 5xx raises ``StoreUnavailable`` (a
``runtime.Unavailable``: the RPC answers UNAVAILABLE) after at most about 2 x (connect + read).
"""

from __future__ import annotations

import functools
import inspect
import io
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any, TypeVar
from urllib.parse import urlencode

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error, ServerError

from services.storage.base import (
    ObjectInfo,
    ObjectNotFound,
    StoreUnavailable,
    StrPath,
    check_key,
    check_prefix,
)

CONNECT_TIMEOUT_SECONDS = 2.0
READ_TIMEOUT_SECONDS = 10.0
RETRIES = 2
_UNREACHABLE = (urllib3.exceptions.HTTPError, ServerError, ConnectionError, TimeoutError)
F = TypeVar("F", bound=Callable[..., Any])


def _fails_fast(method: F) -> F:
    """Turns transport failures of ``method`` (plain or generator) into ``StoreUnavailable``."""

    def unavailable(self: MinioObjectStore, error: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"object store {self.endpoint} unreachable ({type(error).__name__})")

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def generator(self: MinioObjectStore, *args: Any, **kwargs: Any) -> Any:
            try:
                yield from method(self, *args, **kwargs)
            except _UNREACHABLE as error:
                raise unavailable(self, error) from error

        return generator  # type: ignore[return-value]

    @functools.wraps(method)
    def plain(self: MinioObjectStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except _UNREACHABLE as error:
            raise unavailable(self, error) from error

    return plain  # type: ignore[return-value]


# DeleteObjects accepts at most 1000 keys per request.
_DELETE_BATCH = 1000
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})


class MinioObjectStore:
    """Objects in ``bucket`` at ``endpoint`` (``host:port``, no scheme)."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str = "us-east-1",
        create_bucket: bool = True,
        connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS,
        read_timeout_seconds: float = READ_TIMEOUT_SECONDS,
    ) -> None:
        if "://" in endpoint or "/" in endpoint:
            raise ValueError(f"endpoint must be 'host:port' without scheme or path, got {endpoint!r}")
        self.endpoint = endpoint
        self.bucket = bucket
        self.secure = secure
        self.region = region
        self._access_key = access_key
        self._secret_key = secret_key
        # region is passed explicitly so the client never issues a GetBucketLocation round trip.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_seconds, read=read_timeout_seconds),
            retries=urllib3.Retry(
                total=RETRIES,
                read=0,  # a read that timed out is not retried: the store is hanging
                backoff_factor=0.1,
                status_forcelist=(500, 502, 503, 504),
                allowed_methods=None,
            ),
            maxsize=16,
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        # Only non-default settings go in the URL, so it round-trips through open_store.
        query: dict[str, str] = {}
        if secure:
            query["secure"] = "true"
        if region != "us-east-1":
            query["region"] = region
        self.url = f"s3://{endpoint}/{bucket}" + (f"?{urlencode(query)}" if query else "")
        if create_bucket:
            self._ensure_bucket()

    def __repr__(self) -> str:
        return f"MinioObjectStore({self.url!r})"

    @_fails_fast
    def _ensure_bucket(self) -> None:
        if self.client.bucket_exists(self.bucket):
            return
        try:
            self.client.make_bucket(self.bucket, location=self.region)
        except S3Error as exc:
            # Another process created it between our check and our create.
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    @_fails_fast
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        check_key(key)
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    @_fails_fast
    def put_file(self, key: str, path: StrPath, content_type: str = "application/octet-stream") -> None:
        check_key(key)
        # fput_object switches to a multipart upload for large files (parts sized by the client).
        self.client.fput_object(self.bucket, key, str(path), content_type=content_type)

    @_fails_fast
    def get_bytes(self, key: str) -> bytes:
        check_key(key)
        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            raise _translate(exc, key) from exc
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    @_fails_fast
    def get_file(self, key: str, path: StrPath) -> None:
        check_key(key)
        try:
            # Downloads to a ".part.minio" sibling and renames, so the target is never torn.
            self.client.fget_object(self.bucket, key, str(path))
        except S3Error as exc:
            raise _translate(exc, key) from exc

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    @_fails_fast
    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        try:
            obj = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            raise _translate(exc, key) from exc
        return ObjectInfo(key=key, size=obj.size or 0, modified=obj.last_modified)

    @_fails_fast
    def list(self, prefix: str = "", recursive: bool = True) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        objects = self.client.list_objects(self.bucket, prefix=prefix or None, recursive=recursive)
        infos = (
            ObjectInfo(key=obj.object_name or "", size=0)
            if obj.is_dir
            else ObjectInfo(key=obj.object_name or "", size=obj.size or 0, modified=obj.last_modified)
            for obj in objects
        )
        if recursive:
            yield from infos  # already in key order, streamed page by page
        else:
            # S3 returns a page's objects and common prefixes as two separate sorted lists.
            yield from sorted(infos, key=lambda info: info.key)

    @_fails_fast
    def delete(self, key: str) -> None:
        check_key(key)
        try:
            self.client.remove_object(self.bucket, key)
        except S3Error as exc:
            if exc.code not in _NOT_FOUND_CODES:
                raise

    @_fails_fast
    def delete_prefix(self, prefix: str) -> int:
        if not check_prefix(prefix):
            raise ValueError("refusing to delete_prefix(''): pass the prefix to delete")
        keys = (info.key for info in self.list(prefix))
        deleted = 0
        while batch := list(islice(keys, _DELETE_BATCH)):
            errors = list(self.client.remove_objects(self.bucket, [DeleteObject(k) for k in batch]))
            if errors:
                raise RuntimeError(
                    f"delete_prefix({prefix!r}) failed for {len(errors)} object(s), first: {errors[0]}"
                )
            deleted += len(batch)
        return deleted

    def storage_options(self) -> dict[str, str]:
        """polars/object_store options reaching this server (also usable by other object_store readers)."""
        options = {
            "aws_endpoint_url": f"{'https' if self.secure else 'http'}://{self.endpoint}",
            "aws_access_key_id": self._access_key,
            "aws_secret_access_key": self._secret_key,
            "aws_region": self.region,
        }
        if not self.secure:
            options["aws_allow_http"] = "true"
        return options

    def scan_target(self, key: str) -> tuple[str, dict[str, str] | None]:
        check_prefix(key)
        return f"s3://{self.bucket}/{key}", self.storage_options()


def _translate(exc: S3Error, key: str) -> Exception:
    return ObjectNotFound(key) if exc.code in _NOT_FOUND_CODES else exc
