"""Personas computed in child processes of the audience pod (``FLASHCROWD_COMPUTE_PROCESSES``).

A persona joins a pack's members with every profile and behaviour pair of the population (polars,
seconds on millions of users); run on the serving process's threads it holds the GIL between polars
calls and CheckMembership waits for it. With ``processes > 0`` the work goes to a
``ProcessPoolExecutor`` (spawned, each child opening the same object store once): the server only
loads the pack's bitmap, charges the privacy budget and ships the members, the noise parameters
and the limits to a child, which returns the finished persona. Without processes (the embedded
default and tests) it runs on a thread as before.

A child that dies (OOM-killed) breaks the pool: that call answers UNAVAILABLE and the next one gets
a fresh pool. At shutdown pending calls are cancelled and the children stopped.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from flashcrowd.audience.v1 import pack_pb2
from pyroaring import BitMap

from services.audience.bots import bot_bitmap
from services.audience.pack_builds import open_dataset
from services.audience.persona import compute_persona
from services.runtime import Unavailable
from services.storage import ObjectStore, open_store

__all__ = ["ComputePool"]

logger = logging.getLogger(__name__)

_child_store: ObjectStore | None = None


def _open_child_store(store_url: str) -> None:  # a child's initializer
    global _child_store
    _child_store = open_store(store_url)


def _child_persona(dataset_prefix: str, members: bytes, options: dict[str, Any]) -> bytes:
    assert _child_store is not None
    return _persona(_child_store, dataset_prefix, BitMap.deserialize(members), options).SerializeToString()


def _persona(
    store: ObjectStore, dataset_prefix: str, bitmap: BitMap, options: dict[str, Any]
) -> pack_pb2.PackPersona:
    dataset = open_dataset(store, dataset_prefix)
    return compute_persona(dataset, bitmap, bots=bot_bitmap(dataset), **options)


class ComputePool:
    def __init__(self, store: ObjectStore, dataset_prefix: str, processes: int = 0) -> None:
        self.store = store
        self.dataset_prefix = dataset_prefix
        self.processes = processes
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_open_child_store,
                    initargs=(self.store.url,),
                )
            return self._executor

    async def persona(self, bitmap: BitMap, **options: Any) -> pack_pb2.PackPersona:
        """``compute_persona`` of ``bitmap`` with ``options`` (top_n, min_size, pack, version,
        bots_excluded_at_build, noise), in a child process when there are any."""
        if not self.processes:
            return await asyncio.to_thread(_persona, self.store, self.dataset_prefix, bitmap, options)
        pool = self._pool()
        members = bytes(bitmap.serialize())
        try:
            data = await asyncio.get_running_loop().run_in_executor(
                pool, _child_persona, self.dataset_prefix, members, options
            )
        except BrokenProcessPool:
            with self._lock:
                if self._executor is pool:
                    self._executor = None
            pool.shutdown(wait=False, cancel_futures=True)
            logger.warning("a persona process died; a new pool starts with the next call")
            raise Unavailable("the persona computation process stopped; retry") from None
        return pack_pb2.PackPersona.FromString(data)

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            # The children have no public handle; a child busy with a persona would outlive the grace.
            processes = list((getattr(executor, "_processes", None) or {}).values())
            executor.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                if process.is_alive():
                    process.terminate()
