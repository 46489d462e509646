"""Run one flashcrowd service as its own process for a benchmark (so the client does not share its GIL).

``ServiceProcess("services.audience", FLASHCROWD_STORE_URL=...)`` starts ``python -m <module>`` on a
free port with JSON logs, waits for its "serving" log line to learn the port, keeps draining its
stderr, and stops it with SIGTERM (SIGKILL after 30 s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]


class ServiceProcess:
    def __init__(self, module: str, env: dict[str, str], *, start_timeout: float = 120) -> None:
        self.module = module
        full_env = {**os.environ, "FLASHCROWD_PORT": "0", "FLASHCROWD_LOG_JSON": "true", **env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env=full_env, stderr=subprocess.PIPE, text=True
        )
        self.port = self._wait_serving(start_timeout)
        self.target = f"127.0.0.1:{self.port}"
        # Keep draining stderr so that a chatty server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for _ in self.process.stderr:
            pass

    def _wait_serving(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError(f"{self.module} process exited with {self.process.wait()}")
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "serving":
                return int(entry["port"])
        raise TimeoutError(f"{self.module} process did not start serving")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def settings_env(**settings: object) -> dict[str, str]:
    """``store_url="..."`` -> ``{"FLASHCROWD_STORE_URL": "..."}``."""
    return {f"FLASHCROWD_{k.upper()}": str(v) for k, v in settings.items()}
