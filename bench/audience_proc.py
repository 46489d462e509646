"""Helper of the audience benchmarks: run ``python -m services.audience`` as a separate process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class AudienceProcess:
    """The audience service in its own process (so the benchmark client does not share its GIL)."""

    def __init__(self, store_url: str, **settings: str) -> None:
        env = {
            **os.environ,
            "FLASHCROWD_STORE_URL": store_url,
            "FLASHCROWD_PORT": "0",
            "FLASHCROWD_LOG_JSON": "true",
            **{f"FLASHCROWD_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.audience"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
        )
        self.port = self._wait_serving()
        self.target = f"127.0.0.1:{self.port}"
        # Keep draining stderr so that a chatty server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for _ in self.process.stderr:
            pass

    def _wait_serving(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError(f"audience process exited with {self.process.wait()}")
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "serving":
                return int(entry["port"])
        raise TimeoutError("audience process did not start serving")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> AudienceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
