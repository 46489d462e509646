"""A store that is down or hangs fails fast with StoreUnavailable (UNAVAILABLE over gRPC), not after
minutes and not as INTERNAL."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from services.storage import MinioObjectStore
from services.storage.base import StoreUnavailable


@pytest.fixture
def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again: connections are refused


@pytest.fixture
def hanging_port() -> Iterator[int]:
    """Accepts connections and never answers (a store whose disk or process is stuck)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def _store(port: int, read_timeout: float = 0.5) -> MinioObjectStore:
    return MinioObjectStore(
        f"127.0.0.1:{port}", "k", "s", "bucket", create_bucket=False, read_timeout_seconds=read_timeout
    )


@pytest.mark.parametrize("port_fixture", ["refused_port", "hanging_port"])
def test_unreachable_store_answers_unavailable_fast(
    request: pytest.FixtureRequest, port_fixture: str
) -> None:
    store = _store(request.getfixturevalue(port_fixture))
    for call in (
        lambda: store.get_bytes("a/b"),
        lambda: store.put_bytes("a/b", b"x"),
        lambda: store.exists("a/b"),
        lambda: list(store.list("a/")),
    ):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            call()
        assert time.monotonic() - started < 5.0
        status = caught.value.grpc_status()
        assert status.code == grpc.StatusCode.UNAVAILABLE
        assert caught.value.reason == "OBJECT_STORE_UNAVAILABLE"
