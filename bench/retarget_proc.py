"""Helper of the retarget benchmarks: a throwaway PostgreSQL database and ``python -m services.retarget``
as a separate process (so the benchmark client does not share its GIL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


class RetargetProcess:
    """The retarget service in its own process; settings go in as FLASHCROWD_* variables."""

    def __init__(self, database_url: str, **settings: object) -> None:
        env = {
            **os.environ,
            "FLASHCROWD_DATABASE_URL": database_url,
            "FLASHCROWD_PORT": "0",
            "FLASHCROWD_LOG_JSON": "true",
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            **{f"FLASHCROWD_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.retarget"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
        )
        self.port = self._wait_serving()
        self.target = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for _ in self.process.stderr:
            pass

    def _wait_serving(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError(f"retarget process exited with {self.process.wait()}")
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "serving":
                return int(entry["port"])
        raise TimeoutError("retarget process did not start serving")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RetargetProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
