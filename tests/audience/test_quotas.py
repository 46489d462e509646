"""The quota counters on SQLite and PostgreSQL: all-or-none charges, refusals that consume nothing,
no lost or doubled units when replicas race for the last ones; the refusal's shape; the settings."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
import psycopg
import pytest

from services.audience.config import AudienceSettings
from services.audience.quotas import (
    QUOTA_REASON,
    Limit,
    PostgresUsageStore,
    QuotaExceeded,
    SqliteUsageStore,
    TenantLimits,
    TenantQuotas,
    UsageStore,
    default_control_path,
    open_usage_store,
)
from services.runtime import ConfigError, ResourceExhausted, load_settings
from services.runtime.assertion import Caller

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
UPLOADS = Limit("uploads_per_day", "FLASHCROWD_TENANT_MAX_UPLOADS_PER_DAY", 3, "uploads per day")
ROWS = Limit("upload_rows_per_day", "FLASHCROWD_TENANT_MAX_UPLOAD_ROWS_PER_DAY", 100, "uploaded rows per day")


@pytest.fixture
def pg_url() -> Iterator[str]:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3, autocommit=True) as conn:
            name = f"quota_test_{uuid.uuid4().hex[:12]}"
            conn.execute(f"CREATE DATABASE {name}")
    except psycopg.Error as error:
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is unreachable: {error}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _charges_are_all_or_none(store: UsageStore) -> None:
    assert store.consume("t1", "d", [(UPLOADS, 1), (ROWS, 60)]) == [1, 60]
    # The rows would pass their limit: neither counter moves, and the refusal names the rows.
    with pytest.raises(QuotaExceeded) as caught:
        store.consume("t1", "d", [(UPLOADS, 1), (ROWS, 41)])
    assert caught.value.limit == ROWS and caught.value.used == 60 and caught.value.requested == 41
    assert store.used("t1", UPLOADS.name, "d") == 1 and store.used("t1", ROWS.name, "d") == 60
    # More than the whole limit at once: refused on an empty counter too.
    with pytest.raises(QuotaExceeded):
        store.consume("t2", "d", [(ROWS, 101)])
    assert store.used("t2", ROWS.name, "d") == 0
    assert store.consume("t1", "d", [(UPLOADS, 2), (ROWS, 40)]) == [3, 100]
    with pytest.raises(QuotaExceeded) as caught:
        store.consume("t1", "d", [(UPLOADS, 1)])
    assert caught.value.limit == UPLOADS and caught.value.used == 3
    # Other tenants and other days have their own counters.
    assert store.consume("t2", "d", [(UPLOADS, 3)]) == [3]
    assert store.consume("t1", "d+1", [(UPLOADS, 1)]) == [1]
    store.refund("t1", "d", [(UPLOADS, 2), (ROWS, 500)])  # never below zero
    assert store.used("t1", UPLOADS.name, "d") == 1 and store.used("t1", ROWS.name, "d") == 0


def _replicas_race_for_the_last_units(stores: list[UsageStore]) -> None:
    limit = Limit("expansions_per_day", "FLASHCROWD_TENANT_MAX_EXPANSIONS_PER_DAY", 25, "expansions")
    granted: list[int] = []
    refused: list[int] = []
    start = threading.Barrier(len(stores) * 4)

    def worker(store: UsageStore) -> None:
        start.wait()
        for _ in range(10):
            try:
                store.consume("racer", "d", [(limit, 1)])
                granted.append(1)
            except QuotaExceeded:
                refused.append(1)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(granted) == 25 and len(refused) == len(threads) * 10 - 25
    assert all(s.used("racer", limit.name, "d") == 25 for s in stores)


def test_sqlite_counters(tmp_path) -> None:
    path = str(tmp_path / "control.sqlite3")
    store = SqliteUsageStore(path)
    try:
        _charges_are_all_or_none(store)
    finally:
        store.close()
    # Two processes' worth of connections to the same file (replicas on one host).
    replicas = [SqliteUsageStore(path) for _ in range(3)]
    try:
        _replicas_race_for_the_last_units(replicas)
    finally:
        for replica in replicas:
            replica.close()


@pytest.mark.postgres
def test_postgres_counters_shared_by_replicas(pg_url: str) -> None:
    first = open_usage_store(pg_url, "unused")
    second = PostgresUsageStore(pg_url)  # a second replica starting: the schema is created once
    try:
        assert isinstance(first, PostgresUsageStore)
        _charges_are_all_or_none(first)
        assert second.used("t1", UPLOADS.name, "d") == 1  # the other replica sees the same counters
        _replicas_race_for_the_last_units([first, second])
    finally:
        first.close()
        second.close()


def test_refusal_names_the_limit_and_retries_at_midnight(tmp_path) -> None:
    settings = load_settings(
        AudienceSettings, store_url=str(tmp_path / "store"), tenant_max_uploads_per_day=2
    )
    limits = TenantLimits.from_settings(settings)
    assert limits.uploads_per_day.value == 2 and limits.running_builds == 1
    assert limits.live_packs.variable == "FLASHCROWD_TENANT_MAX_LIVE_PACKS"
    noon = datetime(2025, 6, 18, 12, 0, tzinfo=UTC).timestamp()
    quotas = TenantQuotas(limits, SqliteUsageStore(":memory:"), clock=lambda: noon)
    grant = quotas.charge("acme", [(limits.uploads_per_day, 2)])
    assert quotas.used_today("acme", limits.uploads_per_day) == 2
    with pytest.raises(ResourceExhausted) as caught:
        quotas.charge("acme", [(limits.uploads_per_day, 1)])
    error = caught.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == QUOTA_REASON
    assert error.violations == [
        ("tenants/acme", "at most 2 uploads per day per tenant (FLASHCROWD_TENANT_MAX_UPLOADS_PER_DAY)")
    ]
    assert error.metadata == {
        "quota": "uploads_per_day",
        "variable": "FLASHCROWD_TENANT_MAX_UPLOADS_PER_DAY",
        "limit": "2",
        "used": "2",
    }
    assert error.retry_after_seconds == 12 * 3600  # 00:00 UTC tomorrow
    with pytest.raises(ResourceExhausted):
        quotas.require_room("acme", limits.uploads_per_day)
    grant.refund()
    grant.refund()  # once only
    assert quotas.used_today("acme", limits.uploads_per_day) == 0
    quotas.require_room("acme", limits.uploads_per_day, 2)
    with pytest.raises(ResourceExhausted):
        quotas.check_count("acme", limits.live_packs, 50)
    quotas.check_count("acme", limits.live_packs, 49)
    # Only tenant principals are held to tenant quotas.
    assert TenantQuotas.applies_to(Caller.for_tenant("acme"))
    assert not TenantQuotas.applies_to(Caller.platform("ad-serving"))
    assert not TenantQuotas.applies_to(None)
    quotas.close()


def test_settings_bounds_name_the_variable(tmp_path) -> None:
    for variable, value in (
        ("tenant_max_live_packs", 0),
        ("tenant_max_queued_builds", 0),
        ("tenant_max_running_builds", 65),
        ("tenant_max_uploads_per_day", -1),
        ("tenant_max_expansions_per_day", 0),
        ("max_trainings_per_day", 0),
        ("control_database_url", "mysql://db/x"),
    ):
        with pytest.raises(ConfigError) as caught:
            load_settings(AudienceSettings, **{variable: value})
        assert f"FLASHCROWD_{variable.upper()}" in str(caught.value)


def test_the_embedded_default_sits_beside_a_local_store(tmp_path) -> None:
    assert default_control_path((tmp_path / "store").as_uri()) == str(tmp_path / "store.control.sqlite3")
    one = default_control_path("s3://minio:9000/bucket")
    assert one.startswith("var/audience-control-") and one.endswith(".sqlite3")
    assert default_control_path("s3://minio:9000/other") != one  # one queue per store
    store = open_usage_store(f"sqlite:///{tmp_path}/x.sqlite3", "unused")
    assert isinstance(store, SqliteUsageStore) and store.path == f"{tmp_path}/x.sqlite3"
    store.close()
