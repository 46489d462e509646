"""Worker processes started by an audience server (``FLASHCROWD_WORKER_PROCESSES``).

Each child is ``python -m services.audience.worker`` with the parent's environment, on a free port
(health only), in the parent's process group so that a Kubernetes SIGTERM reaches it too; on Linux
it also gets SIGTERM when the parent dies (``PR_SET_PDEATHSIG``, which the child sets itself:
``die_with_parent``), so a SIGKILLed server leaves no orphan holding leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


#: Set in a child's environment: the pid of the server that started it.
PARENT_VARIABLE = "FLASHCROWD_WORKER_PARENT_PID"


def die_with_parent() -> None:
    """In a child: ask for SIGTERM when the parent dies (and stop now if it already has).

    Done by the child itself rather than in ``preexec_fn``, which is unsafe in a threaded parent.
    """
    parent = os.environ.get(PARENT_VARIABLE)
    if not parent:
        return
    with contextlib.suppress(OSError, AttributeError):  # not Linux/glibc: the parent's SIGTERM still works
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):
        raise SystemExit("audience-worker: the server that started it is gone")


def _spawn() -> subprocess.Popen:
    env = {**os.environ, "FLASHCROWD_PORT": "0", "FLASHCROWD_WORKER_PROCESSES": "0",
           PARENT_VARIABLE: str(os.getpid())}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "services.audience.worker"], env=env)


@dataclass
class WorkerProcesses:
    """The pod's pool of build workers; ``supervise`` replaces one that died (its builds' leases
    expire and any worker of the fleet takes them over)."""

    children: list[subprocess.Popen] = field(default_factory=list)
    stopping: bool = False

    @classmethod
    def start(cls, count: int) -> WorkerProcesses:
        children = [_spawn() for _ in range(count)]
        logger.info(
            "started %d audience-worker process(es)", count, extra={"pids": [c.pid for c in children]}
        )
        return cls(children)

    async def supervise(self, interval_seconds: float = 1.0) -> None:
        """Until ``terminate``: reap dead children and start a replacement for each (logged)."""
        while not self.stopping:
            await asyncio.sleep(interval_seconds)
            for index, child in enumerate(self.children):
                if self.stopping or child.poll() is None:
                    continue
                replacement = _spawn()
                logger.warning(
                    "audience-worker %d exited with status %s: started %d in its place",
                    child.pid, child.returncode, replacement.pid,
                )  # fmt: skip
                self.children[index] = replacement

    def terminate(self) -> None:
        self.stopping = True
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    async def wait(self, grace_seconds: float) -> None:
        """SIGTERM every child, wait up to ``grace_seconds``, then SIGKILL what is left."""
        self.terminate()
        deadline = time.monotonic() + grace_seconds
        while any(c.poll() is None for c in self.children) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for child in self.children:
            if child.poll() is None:
                logger.warning("audience-worker %d did not stop within the grace: killed", child.pid)
                child.kill()
                child.wait()


__all__ = ["PARENT_VARIABLE", "WorkerProcesses", "die_with_parent"]
