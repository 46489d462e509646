"""Which sale-monitor replica evaluates the campaign rules: a lease in NATS JetStream's key-value store.

Every replica keeps counters and answers GetSaleStats; only the lease holder evaluates rules, so a
rule fires once however many replicas run. The lease is one key (``rules-leader``) in the bucket
``flashcrowd_leases`` whose entries expire ``ttl`` seconds after their last write (the bucket's max
age). The holder renews it every evaluation with a compare-and-set on the revision it wrote
(``update(last=revision)``); any other replica tries ``create`` (only succeeds when the key is
absent or expired). A holder killed with SIGKILL stops renewing, and another replica takes over
within ``ttl`` plus one evaluation interval; a holder that stops cleanly deletes the key at once.

With the in-process bus (``memory://``, one process) there is nothing to share: ``LocalLease``
always holds.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any, Protocol

logger = logging.getLogger(__name__)

BUCKET = "flashcrowd_leases"
KEY = "rules-leader"


class Lease(Protocol):
    holder: str

    async def hold(self) -> bool:
        """Acquire or renew; True while this replica holds the lease."""
        ...

    async def release(self) -> None: ...


def instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class LocalLease:
    """One process, nothing to share."""

    def __init__(self, holder: str | None = None) -> None:
        self.holder = holder or instance_id()

    async def hold(self) -> bool:
        return True

    async def release(self) -> None:
        return None


class NatsLease:
    """The lease on NATS JetStream KV (see the module doc)."""

    def __init__(
        self,
        servers: str | list[str],
        *,
        ttl_seconds: float = 5.0,
        holder: str | None = None,
        key: str = KEY,
    ) -> None:
        self.servers = servers
        self.ttl = ttl_seconds
        self.key = key
        self.holder = holder or instance_id()
        self._nc: Any = None
        self._kv: Any = None
        self._revision: int | None = None

    async def _bucket(self) -> Any:
        if self._kv is None:
            import nats
            from nats.js.errors import BucketNotFoundError

            self._nc = await nats.connect(
                self.servers, connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.5
            )
            js = self._nc.jetstream(timeout=2)
            try:
                self._kv = await js.key_value(BUCKET)
            except BucketNotFoundError:
                self._kv = await js.create_key_value(bucket=BUCKET, ttl=self.ttl, history=1)
        return self._kv

    async def hold(self) -> bool:
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            kv = await self._bucket()
            if self._revision is not None:
                try:
                    self._revision = await kv.update(self.key, self.holder.encode(), last=self._revision)
                    return True
                except KeyWrongLastSequenceError:
                    logger.warning("rules lease lost by %s (expired or taken over)", self.holder)
                    self._revision = None
            try:
                self._revision = await kv.create(self.key, self.holder.encode())
            except KeyWrongLastSequenceError:
                return False  # another replica holds it
            logger.info("rules lease taken by %s", self.holder)
            return True
        except Exception as error:  # NATS down: hold nothing (no rule fires twice), try again later
            logger.warning("rules lease unavailable (%s): not evaluating", type(error).__name__)
            self._revision = None
            return False

    async def release(self) -> None:
        try:
            if self._kv is not None and self._revision is not None:
                await self._kv.delete(self.key, last=self._revision)
        except Exception:  # expired or taken over meanwhile: nothing to release
            pass
        finally:
            self._revision = None
            if self._nc is not None:
                await self._nc.close()
                self._nc = self._kv = None


def open_lease(bus_url: str, ttl_seconds: float, key: str = KEY) -> Lease:
    """A NATS lease for ``nats://`` / ``tls://`` buses, a local one otherwise."""
    if bus_url.startswith(("nats://", "tls://")):
        head, _, _ = bus_url.partition("?")
        scheme, _, hosts = head.partition("://")
        servers = [f"{scheme}://{host}" for host in hosts.split(",") if host]
        return NatsLease(servers, ttl_seconds=ttl_seconds, key=key)
    return LocalLease()


__all__ = ["Lease", "LocalLease", "NatsLease", "instance_id", "open_lease"]
