"""``flashcrowd dev up`` and the admin CLI, run as a new user would: the README's commands work."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .conftest import ROOT


def _free_block(count: int) -> list[int]:
    """``count`` consecutive free ports below the kernel's ephemeral range (32768+), so that no
    client socket of another process takes one of them before the stack binds it."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 32_000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return list(range(base, base + count))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no block of free ports")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dev_up_then_tenant_and_key_commands(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHCROWD_")}
    env["FLASHCROWD_GATEWAY_ASSERTION_KEY"] = os.environ["FLASHCROWD_GATEWAY_ASSERTION_KEY"]
    base, *_, http = _free_block(5)  # gateway, audience, retarget, monitor, HTTP
    state = tmp_path / "dev"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "dev", "up", "--dir", str(state),
         "--base-port", str(base), "--http-port", str(http), "--users", "2000"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("dev: ready"):
                break
        assert any(line.startswith("dev: ready") for line in lines), "".join(lines)
        gateway = ["--gateway", f"127.0.0.1:{base}", "--dir", str(state)]
        created = _cli("tenant", "create", "shop", *gateway, env=env)
        assert created.returncode == 0 and "tenants/shop" in created.stdout, created.stderr
        key = _cli(
            "key",
            "create",
            "--tenant",
            "shop",
            "--scopes",
            "packs.read,packs.write",
            "--json",
            *gateway,
            env=env,
        )
        assert key.returncode == 0, key.stderr
        secret = json.loads(key.stdout)["secret"]
        refused = _cli("key", "create", "--tenant", "shop", "--scopes", "members.read", *gateway, env=env)
        assert refused.returncode == 2 and "platform scopes" in refused.stderr
        request = urllib.request.Request(f"http://127.0.0.1:{http}/v1/whoami", headers={"X-Api-Key": secret})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["tenant"] == "shop"
        name = json.loads(key.stdout)["apiKey"]["name"]
        assert _cli("key", "revoke", name, *gateway, env=env).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
