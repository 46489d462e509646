"""``flashcrowd dev up``: the whole stack as separate processes on fixed ports, for a laptop.

Starts, each as its own ``python -m`` process with its log in ``DIR/logs``: audience, retarget,
the sale monitor, the compactor (with NATS) and the gateway, on ports ``BASE`` (gateway gRPC),
``BASE+1`` (audience), ``BASE+2`` (retarget), ``BASE+3`` (sale monitor) and ``--http-port``
(gateway HTTP/JSON). A small world is generated into ``DIR/store`` on first use. The event bus is
NATS JetStream at ``--nats`` when it answers (live packs, the sale monitor and the compactor share
it), else the in-process bus (audience only; the monitor and compactor are then not started).

Every process runs from the current directory, so they share the embedded defaults under ./var:
the gateway assertion key and the identity pepper. The system admin key is generated once into
``DIR/bootstrap-admin-key`` and printed; ``flashcrowd tenant create`` / ``flashcrowd key create``
read it from there. Ctrl-C (or SIGTERM) stops every process gracefully.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from services.cli.common import CliError

NAME = "dev"
HELP = "run the whole stack locally as separate processes (flashcrowd dev up)"
DEFAULT_DIR = Path("var/dev")
ADMIN_KEY_FILE = "bootstrap-admin-key"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dev_command", metavar="COMMAND", required=True)
    up = sub.add_parser("up", help="start audience, retarget, sale monitor, compactor and gateway")
    up.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory (default var/dev)")
    up.add_argument("--base-port", type=int, default=50050, help="gateway gRPC port; backends follow")
    up.add_argument("--http-port", type=int, default=8080, help="gateway HTTP/JSON port")
    up.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS JetStream URL ('' = none)")
    up.add_argument("--users", type=int, default=20_000, help="users of the generated world")
    up.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for health")
    up.add_argument("--exit-when-ready", action="store_true", help="stop everything once all are up")


def admin_key_path(directory: Path = DEFAULT_DIR) -> Path:
    return directory / ADMIN_KEY_FILE


def _admin_key(directory: Path) -> str:
    path = admin_key_path(directory)
    if path.exists():
        return path.read_text().strip()
    key = f"fc_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def _reachable(url: str) -> bool:
    if not url.startswith("nats://"):
        return False
    host, _, port = url[len("nats://") :].rpartition("@")[2].partition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port or 4222)), timeout=1):
            return True
    except OSError:
        return False


def _world(store: Path, users: int) -> None:
    if (store / "data").exists():
        return
    from services.events.generator import GenConfig, generate
    from services.storage import LocalObjectStore

    print(f"dev: generating a world of {users:,} users into {store} (first run only)", flush=True)
    generate(LocalObjectStore(store), GenConfig(users=users, days=8, seed=7))


def _plan(args: argparse.Namespace, bus: str, admin_key: str) -> dict[str, tuple[str, dict[str, str]]]:
    base = args.base_port
    store = (args.dir / "store").resolve()
    common = {
        "FLASHCROWD_STORE_URL": store.as_uri(),
        "FLASHCROWD_LOG_JSON": "false",
        "FLASHCROWD_BUS_URL": bus,
    }
    ports = {"gateway": base, "audience": base + 1, "retarget": base + 2, "monitor": base + 3}
    plan: dict[str, tuple[str, dict[str, str]]] = {
        "audience": ("services.audience", {"FLASHCROWD_PORT": str(ports["audience"])}),
        "retarget": (
            "services.retarget",
            {
                "FLASHCROWD_PORT": str(ports["retarget"]),
                "FLASHCROWD_DATABASE_URL": f"sqlite:///{(args.dir / 'retarget.db').resolve()}",
                "FLASHCROWD_AUDIENCE_TARGET": f"127.0.0.1:{ports['audience']}",
            },
        ),
    }
    if bus.startswith("nats://"):
        plan["monitor"] = (
            "services.monitor",
            {
                "FLASHCROWD_PORT": str(ports["monitor"]),
                "FLASHCROWD_RETARGET_TARGET": f"127.0.0.1:{ports['retarget']}",
            },
        )
        plan["compactor"] = ("services.compactor", {})
    plan["gateway"] = (
        "services.gateway",
        {
            "FLASHCROWD_PORT": str(ports["gateway"]),
            "FLASHCROWD_HTTP_PORT": str(args.http_port),
            "FLASHCROWD_AUDIENCE_TARGET": f"127.0.0.1:{ports['audience']}",
            "FLASHCROWD_RETARGET_TARGET": f"127.0.0.1:{ports['retarget']}",
            "FLASHCROWD_SALE_MONITOR_TARGET": f"127.0.0.1:{ports['monitor']}",
            "FLASHCROWD_KEYSTORE_PATH": str((args.dir / "gateway-keys.sqlite3").resolve()),
            "FLASHCROWD_BOOTSTRAP_ADMIN_KEY": admin_key,
        },
    )
    return {name: (module, {**common, **env}) for name, (module, env) in plan.items()}


def _wait_serving(target: str, proc: subprocess.Popen, deadline: float) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return True
            except grpc.RpcError:
                time.sleep(0.2)
    return False


def _stop(procs: dict[str, subprocess.Popen], grace: float = 10.0) -> None:
    for proc in reversed(list(procs.values())):  # the gateway first, the audience last
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def run(args: argparse.Namespace) -> int:
    args.dir.mkdir(parents=True, exist_ok=True)
    logs = args.dir / "logs"
    logs.mkdir(exist_ok=True)
    _world(args.dir / "store", args.users)
    admin_key = _admin_key(args.dir)
    bus = args.nats if args.nats and _reachable(args.nats) else "memory://"
    if bus == "memory://":
        print(
            f"dev: NATS not reachable at {args.nats or '(none)'}: "
            "in-process bus, no sale monitor or compactor"
        )
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHCROWD_")}
    procs: dict[str, subprocess.Popen] = {}
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + args.ready_timeout
        for name, (module, env) in _plan(args, bus, admin_key).items():
            log = (logs / f"{name}.log").open("ab")
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", module], env={**base_env, **env}, stdout=log, stderr=subprocess.STDOUT
            )
            port = env.get("FLASHCROWD_PORT")
            if port and not _wait_serving(f"127.0.0.1:{port}", procs[name], deadline):
                tail = (logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise CliError(
                    f"{name} did not become SERVING on port {port}; its log ({logs}/{name}.log):\n{tail}"
                )
            print(
                f"dev: {name:<9} up{f'  127.0.0.1:{port}' if port else ''}  (log {logs / name}.log)",
                flush=True,
            )
        print(
            f"dev: ready. gateway gRPC 127.0.0.1:{args.base_port}, HTTP http://127.0.0.1:{args.http_port}\n"
            f"     system admin key in {admin_key_path(args.dir)}; next:\n"
            f"       flashcrowd tenant create shop --dir {args.dir}\n"
            f"       flashcrowd key create --tenant shop --scopes packs.read,packs.write --dir {args.dir}",
            flush=True,
        )
        while not stopping and not args.exit_when_ready:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise CliError(f"{name} exited with {proc.returncode}; see {logs}/{name}.log")
            time.sleep(0.5)
    finally:
        _stop(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("dev: stopped", flush=True)
    return 0
