"""The flash-sale story end to end on embedded defaults: ``flashcrowd demo``.

Generates a small world, starts the audience and retarget services in this process on free
loopback ports (local object store, SQLite ledger), and drives them over real gRPC channels the
way callers would: build the seed story's packs, show a persona, check memberships, expand the
buyers to a lookalike, replay the sale hour through the ingest path (live counters, a live pack,
the stop rule), then launch the retargeting campaign to clickers-not-buyers with two coupon arms
and a holdout, simulate redemptions, and print the funnel and ROI.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from flashcrowd.audience.v1 import audience_service_pb2 as aud
from flashcrowd.audience.v1 import audience_service_pb2_grpc as aud_grpc
from flashcrowd.audience.v1 import pack_pb2
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from services.audience.config import AudienceSettings
from services.audience.server import create_audience_server
from services.audience.spec_io import spec_from_data
from services.demo import render
from services.demo.lookalike import lookalike_step
from services.demo.realtime import realtime_step, use_demo_bus
from services.demo.retarget import retarget_step, start_retarget
from services.demo.specs import story_specs
from services.events.dataset import EventDataset
from services.events.generator import GenConfig, generate
from services.runtime.assertion import platform_channel
from services.storage import LocalObjectStore

TENANT = "tenants/demo-shop"
M = TypeVar("M", bound=Message)
DEMO_PERSONA_MIN_SIZE = 500


@dataclass
class DemoOptions:
    workdir: Path
    users: int = 50_000
    days: int = 8
    seed: int = 7


class Demo:
    """One run of the story; holds the channels and the world between steps."""

    def __init__(self, options: DemoOptions) -> None:
        self.opt = options
        self.store_dir = options.workdir / "store"
        self.store = LocalObjectStore(self.store_dir)
        self.world: dict[str, Any] = {}
        self.packs: dict[str, pack_pb2.Pack] = {}
        self._servers: list[tuple[grpc.aio.Server, Any]] = []
        self._channels: list[grpc.aio.Channel] = []

    # -- set-up ---------------------------------------------------------------------------

    def generate_world(self) -> None:
        render.section("1. A world of behaviour", "deterministic generator, local object store")
        cfg = GenConfig(users=self.opt.users, days=self.opt.days, seed=self.opt.seed)
        result = generate(self.store, cfg, progress=True, overwrite=True)
        self.world = EventDataset(self.store, cfg.prefix).world
        sale = self.world["sale"]
        story = result.story
        render.note(f"sale: [bold]{sale['name']}[/bold] at {sale['start_beijing']} (T-0)")
        render.table(
            "generated",
            ["what", "value"],
            [
                ("users", result.users),
                ("events", result.events),
                ("files (day partitions)", result.files),
                ("events/s", int(result.events_per_second)),
                ("hook item paid at sale price", story.get("hook_pays_at_sale_price", 0)),
                ("hook item sold out after", _seconds(story.get("hook_sold_out_after_s"))),
            ],
        )

    async def start_services(self) -> None:
        render.section("2. Services", "in this process, real gRPC on loopback")
        # A 50k-user world sells 500 hook T-shirts to ~600 buyers: below the production persona
        # minimum (1,000), so the demo lowers it to show the buyers' persona next to the lookalike.
        settings = AudienceSettings(
            store_url=self.store.url, port=0, log_json=False, persona_min_size=DEMO_PERSONA_MIN_SIZE
        )
        server, port, app = await create_audience_server(settings, store=self.store)
        self._servers.append((server, app))
        self.audience_target = f"127.0.0.1:{port}"
        ch = platform_channel(self.audience_target, "demo")
        self._channels.append(ch)
        self.audience = aud_grpc.AudienceServiceStub(ch)
        self.operations = operations_pb2_grpc.OperationsStub(ch)
        render.note(f"audience  {self.audience_target}  (AudienceService, Operations, health, reflection)")
        render.note(f"persona privacy minimum lowered to {DEMO_PERSONA_MIN_SIZE} for this small world")
        await start_retarget(self)

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()
        for server, app in reversed(self._servers):
            await server.stop(1.0)
            close = getattr(app, "close", None)
            if close is not None:
                await close()

    # -- helpers --------------------------------------------------------------------------

    async def wait(self, op: operations_pb2.Operation, result_type: type[M]) -> M:
        while not op.done:
            op = await self.operations.WaitOperation(
                operations_pb2.WaitOperationRequest(name=op.name, timeout=duration_pb2.Duration(seconds=30))
            )
        if op.HasField("error"):
            raise RuntimeError(f"{op.name} failed: {op.error.message}")
        out = result_type()
        op.response.Unpack(out)
        return out

    # -- the story ------------------------------------------------------------------------

    async def build_packs(self) -> None:
        render.section("3. Crowd packs", "CreatePack -> long-running operation -> Pack")
        rows = []
        for pack_id, title, doc in story_specs(self.world):
            spec = spec_from_data(_with_tenant(doc, TENANT))
            t0 = time.perf_counter()
            op = await self.audience.CreatePack(
                aud.CreatePackRequest(
                    parent=TENANT,
                    pack_id=pack_id,
                    pack=pack_pb2.Pack(display_name=title, spec=spec, labels={"story": "flash-sale"}),
                )
            )
            pack = await self.wait(op, pack_pb2.Pack)
            self.packs[pack_id] = pack
            stats = pack.build_stats
            rows.append(
                (
                    pack_id,
                    pack.size,
                    stats.bots_excluded,
                    f"{stats.files_read}/{stats.files_total}",
                    f"{(time.perf_counter() - t0) * 1000:.0f} ms",
                )
            )
        render.table(
            "packs built over gRPC",
            ["pack", "members", "bots excluded", "files read", "build"],
            rows,
        )

    async def persona(self, pack_id: str) -> pack_pb2.PackPersona:
        return await self.audience.GetPackPersona(
            aud.GetPackPersonaRequest(name=self.packs[pack_id].name, top_n=5)
        )

    async def show_persona(self, pack_id: str) -> None:
        render.section("4. Persona", f"{pack_id}: distributions with TGI against the population")
        persona = await self.persona(pack_id)
        render.note(
            f"{persona.size:,} members of a population of {persona.population_size:,} "
            f"({persona.bots_excluded:,} bots excluded at build time)"
        )
        for dim in persona.dimensions:
            render.table(
                dim.dimension,
                ["value", "members", "share", "population", "TGI"],
                [
                    (b.value, b.count, f"{b.share:.1%}", f"{b.population_share:.1%}", f"{b.tgi:.0f}")
                    for b in dim.buckets
                ],
            )

    async def check_membership(self) -> None:
        render.section("5. Ad serving", "CheckMembership: many users x several packs in one call")
        names = [self.packs[p].name for p in ("teaser-viewers", "purchasers", "clickers-not-buyers")]
        user_ids = list(range(1, 1001))
        t0 = time.perf_counter()
        resp = await self.audience.CheckMembership(
            aud.CheckMembershipRequest(parent=TENANT, packs=names, user_ids=user_ids)
        )
        ms = (time.perf_counter() - t0) * 1000
        render.table(
            f"users 1..1000 checked in {ms:.1f} ms",
            ["pack", "members among them"],
            [(r.pack.rsplit("/", 1)[-1], sum(r.members)) for r in resp.results],
        )


def _seconds(value: float | None) -> str:
    return "not sold out" if value is None else f"{value / 60:.1f} min"


def _with_tenant(doc: Any, tenant: str) -> Any:
    """Fill ``{tenant}`` placeholders of pack references in a spec document."""
    if isinstance(doc, dict):
        return {k: _with_tenant(v, tenant) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_with_tenant(v, tenant) for v in doc]
    if isinstance(doc, str):
        return doc.replace("{tenant}", tenant)
    return doc


async def run_demo(options: DemoOptions) -> None:
    if options.workdir.exists():
        shutil.rmtree(options.workdir)
    options.workdir.mkdir(parents=True)
    demo = Demo(options)
    await asyncio.to_thread(demo.generate_world)
    use_demo_bus()  # audience and sale monitor of this process share one in-process event bus
    await demo.start_services()
    try:
        await demo.build_packs()
        await demo.show_persona("clickers-not-buyers")
        await demo.check_membership()
        await lookalike_step(
            demo._channels[0], tenant=TENANT, seed_pack=demo.packs["purchasers"].name, title="6. Lookalike"
        )
        await realtime_step(demo, tenant=TENANT, title="7. T-0, live")
        await retarget_step(
            demo,
            tenant=TENANT,
            audience_pack=demo.packs["clickers-not-buyers"].name,
            title="8. After the sale",
        )
    finally:
        await demo.close()
    render.section("Done", f"everything the demo wrote is under {options.workdir}")
