"""Personas in compute processes: the same answer as on a thread, errors that cross the process
boundary intact, noise applied in the child, and a child that dies answered UNAVAILABLE once."""

from __future__ import annotations

import os
import signal

import polars as pl
import pytest
from pyroaring import BitMap

from services.audience.compute_pool import ComputePool
from services.audience.privacy import PersonaNoise
from services.runtime import FailedPrecondition, Unavailable
from tests.audience.conftest import WORLD, World


@pytest.fixture
async def pools(world: World):
    inline, children = ComputePool(world.store, WORLD.prefix), ComputePool(world.store, WORLD.prefix, 1)
    yield inline, children
    children.close()


def _clickers(world: World) -> BitMap:
    return BitMap(world.events.filter(pl.col("event_type") == 5).get_column("user_id").unique().to_list())


async def test_a_child_computes_the_same_persona_as_a_thread(world: World, pools) -> None:
    inline, children = pools
    members = _clickers(world)
    options = {"top_n": 20, "min_size": 100, "pack": "tenants/t/packs/p", "version": 2}
    assert await children.persona(members, **options) == await inline.persona(members, **options)
    noise = PersonaNoise(b"k" * 32, "fingerprint", 0.5)
    noisy = await children.persona(members, noise=noise, **options)
    assert noisy == await inline.persona(members, noise=noise, **options)
    assert noisy != await inline.persona(members, **options)  # the child did apply the noise


async def test_errors_and_a_dead_child(world: World, pools) -> None:
    _, children = pools
    with pytest.raises(FailedPrecondition) as small:
        await children.persona(BitMap(range(1, 10)), min_size=1000, pack="tenants/t/packs/tiny")
    assert small.value.reason == "PACK_TOO_SMALL_FOR_PERSONA" and small.value.metadata["minimum"] == "1000"
    executor = children._pool()
    (pid,) = [p.pid for p in executor._processes.values()]  # the pool's one child
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(Unavailable):
        await children.persona(_clickers(world), min_size=100)
    persona = await children.persona(_clickers(world), min_size=100)  # a fresh pool
    assert persona.size == len(_clickers(world) - BitMap(world.bots))
