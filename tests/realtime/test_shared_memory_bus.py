"""``memory://NAME``: one in-process bus per name, shared by every opener, closed by the last one."""

from __future__ import annotations

import pytest

from services.events.bus import OutgoingBatch, open_bus


async def test_named_memory_bus_is_shared_and_reference_counted() -> None:
    a = open_bus("memory://shared-test", shard_count=2)
    b = open_bus("memory://shared-test", shard_count=2)
    private = open_bus("memory://", shard_count=2)
    assert a is b and a.url == "memory://shared-test" and private is not a
    await a.publish([OutgoingBatch(shard=1, payload=b"x", msg_id="m1", count=1)], timeout=1)
    assert await b.last_seq() == 1 and await private.last_seq() == 0
    with pytest.raises(ValueError, match="2 shards"):
        open_bus("memory://shared-test", shard_count=4)
    await a.close()
    assert b.available  # still held by b
    await b.close()
    assert not b.available
    fresh = open_bus("memory://shared-test", shard_count=4)  # the last close dropped it
    assert fresh is not a and await fresh.last_seq() == 0
    await fresh.close()
    await private.close()
