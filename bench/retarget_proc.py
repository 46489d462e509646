"""Helper of the retarget benchmarks: a throwaway PostgreSQL database and ``python -m services.retarget``
as a separate process (so the benchmark client does not share its GIL)."""

from __future__ import annotations

import uuid

from bench.service_proc import ServiceProcess, settings_env

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def create_pg_database(prefix: str = "retarget_bench") -> str:
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(url: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")


class RetargetProcess(ServiceProcess):
    """The retarget service in its own process; settings go in as FLASHCROWD_* variables."""

    def __init__(self, database_url: str, **settings: object) -> None:
        env = {f"OTEL_{kind}_EXPORTER": "none" for kind in ("TRACES", "METRICS", "LOGS")}
        env |= settings_env(database_url=database_url, **settings)
        super().__init__("services.retarget", env, start_timeout=60)
