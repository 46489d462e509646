"""open_store: one URL setting picks and configures the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.storage import DEFAULT_STORE_URL, LocalObjectStore, MinioObjectStore, open_store
from tests.fixtures.s3server import S3_ACCESS_KEY, S3_SECRET_KEY, s3_url, unique_bucket

NO_ENV: dict[str, str] = {}


def test_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url, expected in [
        (f"file://{tmp_path}/abs", tmp_path / "abs"),
        (f"file://localhost{tmp_path}/host", tmp_path / "host"),
        (str(tmp_path / "plain"), tmp_path / "plain"),
        ("relative/dir", tmp_path / "relative" / "dir"),
        ("file://./var/store", tmp_path / "var" / "store"),
        (DEFAULT_STORE_URL, tmp_path / "var" / "store"),
        ("file:///" + str(tmp_path).lstrip("/") + "/with%20space", tmp_path / "with space"),
    ]:
        store = open_store(url)
        assert isinstance(store, LocalObjectStore), url
        assert store.root == expected, url
        assert expected.is_dir()
    # The url attribute round-trips.
    assert open_store(open_store("file://./x y").url).root == tmp_path / "x y"  # type: ignore[attr-defined]


def test_s3_url_parsing_without_network() -> None:
    store = open_store(
        "s3://AK:se%2Fcr%40et@minio.flashcrowd.svc:9000/packs?secure=true&region=cn-north-1&create_bucket=false",
        env=NO_ENV,
    )
    assert isinstance(store, MinioObjectStore)
    assert (store.endpoint, store.bucket, store.secure, store.region) == (
        "minio.flashcrowd.svc:9000",
        "packs",
        True,
        "cn-north-1",
    )
    assert store.url == "s3://minio.flashcrowd.svc:9000/packs?secure=true&region=cn-north-1"
    source, options = store.scan_target("events/dt=2024-06-18/part-0.parquet")
    assert source == "s3://packs/events/dt=2024-06-18/part-0.parquet"
    assert options == {
        "aws_endpoint_url": "https://minio.flashcrowd.svc:9000",
        "aws_access_key_id": "AK",
        "aws_secret_access_key": "se/cr@et",
        "aws_region": "cn-north-1",
    }
    assert "se/cr@et" not in store.url and "se/cr@et" not in repr(store)


def test_s3_credentials_from_env() -> None:
    url = "s3://127.0.0.1:9000/b?create_bucket=false"
    env = {"AWS_ACCESS_KEY_ID": "aws-ak", "AWS_SECRET_ACCESS_KEY": "aws-sk"}
    store = open_store(url, env=env)
    assert store.scan_target("k")[1]["aws_access_key_id"] == "aws-ak"  # type: ignore[index]
    env |= {"FLASHCROWD_S3_ACCESS_KEY": "fc-ak", "FLASHCROWD_S3_SECRET_KEY": "fc-sk"}
    options = open_store(url, env=env).scan_target("k")[1]
    assert options is not None
    assert (options["aws_access_key_id"], options["aws_secret_access_key"]) == ("fc-ak", "fc-sk")
    assert options["aws_allow_http"] == "true" and options["aws_endpoint_url"] == "http://127.0.0.1:9000"
    # The URL wins over the environment.
    options = open_store("s3://u:p@127.0.0.1:9000/b?create_bucket=false", env=env).scan_target("k")[1]
    assert options is not None and options["aws_access_key_id"] == "u"


def test_s3_credentials_default_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHCROWD_S3_ACCESS_KEY", "from-os")
    monkeypatch.setenv("FLASHCROWD_S3_SECRET_KEY", "from-os-secret")
    options = open_store("s3://127.0.0.1:9000/b?create_bucket=false").scan_target("k")[1]
    assert options is not None and options["aws_access_key_id"] == "from-os"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty object store URL"),
        ("http://127.0.0.1:9000/bucket", "unsupported object store URL scheme 'http'"),
        ("gs://bucket", "unsupported object store URL scheme 'gs'"),
        ("file://var/store", "names host 'var'.*three slashes"),
        ("file:///x?y=1", "query"),
        ("s3://a:b@/bucket", "no host"),
        ("s3://a:b@host:9000", "exactly one bucket"),
        ("s3://a:b@host:9000/", "exactly one bucket"),
        ("s3://a:b@host:9000/bucket/extra", "exactly one bucket"),
        ("s3://a:b@host:port/bucket", "invalid S3 store URL"),
        ("s3://a:b@host:9000/bucket?secure=maybe", "secure='maybe'.*true or false"),
        ("s3://a:b@host:9000/bucket?sekure=true", r"unknown parameter\(s\) \['sekure'\]"),
        ("s3://a:b@host:9000/bucket?secure=true&secure=false", "repeated parameter"),
        ("s3://a@host:9000/bucket", "both ACCESS and SECRET"),
        ("s3://host:9000/bucket", "no S3 credentials.*FLASHCROWD_S3_ACCESS_KEY"),
    ],
)
def test_invalid_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        open_store(url, env=NO_ENV)
    if "s3://" in url:
        assert "s3://" in str(info.value) and "bucket" in str(info.value)  # says what form is expected


def test_secrets_not_in_errors() -> None:
    with pytest.raises(ValueError) as info:
        open_store("s3://AK:top/secret@host:9000/bucket", env=NO_ENV)
    assert "top/secret" not in str(info.value) and "secret@" not in str(info.value)


def test_s3_end_to_end(s3_server: str) -> None:
    bucket = unique_bucket("factory")
    store = open_store(s3_url(s3_server, bucket), env=NO_ENV)  # creates the bucket
    assert isinstance(store, MinioObjectStore)
    store.put_bytes("k", b"v")
    # Another process would open the same bucket from the secret-free url plus env credentials.
    env = {"FLASHCROWD_S3_ACCESS_KEY": S3_ACCESS_KEY, "FLASHCROWD_S3_SECRET_KEY": S3_SECRET_KEY}
    again = open_store(store.url, env=env)
    assert again.get_bytes("k") == b"v"
    store.delete_prefix("k")
    store.client.remove_bucket(bucket)
