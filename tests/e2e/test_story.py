"""The seed story across real processes, through the gateway only, and the traces it leaves.

gateway -> audience and gateway -> retarget -> audience must each be one trace with correct parent
links: gateway SERVER span > gateway CLIENT span > backend SERVER span (> backend CLIENT span >
audience SERVER span).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc.aio
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc

from tests.gateway.story import Client, seed_story

from .conftest import BOOTSTRAP, CLIENT, SERVER, Processes, Span


def ancestors(span: Span, index: dict[bytes, Span]) -> list[Span]:
    chain = []
    while span.parent_id and span.parent_id in index:
        span = index[span.parent_id]
        chain.append(span)
    return chain


def child_of(child: Span, parent: Span) -> bool:
    return child.trace_id == parent.trace_id and child.parent_id == parent.span_id


async def spans_until(processes: Processes, predicate, seconds: float = 15) -> dict[bytes, Span]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while True:
        index = processes.collector.by_id()
        if predicate(index) or time.monotonic() > deadline:
            return index
        await asyncio.sleep(0.2)


def gateway_server_spans(index: dict[bytes, Span], method: str) -> list[Span]:
    return [
        s for s in index.values() if s.service == "gateway" and s.kind == SERVER and s.name.endswith(method)
    ]


def hop(index: dict[bytes, Span], parent: Span, service: str) -> list[tuple[Span, Span]]:
    """``(client span of parent's service, server span of service)`` pairs one hop below ``parent``."""
    pairs = []
    for client in index.values():
        if client.kind != CLIENT or client.service != parent.service:
            continue
        if parent not in ancestors(client, index):
            continue
        for server in index.values():
            if server.kind == SERVER and server.service == service and child_of(server, client):
                pairs.append((client, server))
    return pairs


async def test_seed_story_across_processes(processes: Processes) -> None:
    async with grpc.aio.insecure_channel(processes.target("gateway")) as channel:
        admin = gw_grpc.GatewayServiceStub(channel)
        boot = (("x-api-key", BOOTSTRAP),)
        await admin.CreateTenant(gw.CreateTenantRequest(tenant_id="shop"), metadata=boot)
        key = await admin.CreateApiKey(
            gw.CreateApiKeyRequest(
                parent="tenants/shop",
                scopes=["packs.read", "packs.write", "campaigns.read", "campaigns.write"],
            ),
            metadata=boot,
        )
        serving = await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent="platform", scopes=["members.read", "members.write"]), metadata=boot
        )
        client = Client(channel, "shop", (("x-api-key", key.secret),), (("x-api-key", serving.secret),))
        result = await seed_story(client)

    assert result.clickers.size > result.audience_pack.size > 0
    # The tenant sees noisy counts (differential privacy): persona and pack sizes agree closely.
    assert abs(result.persona.size - result.clickers.size) <= 100 and result.persona.dimensions
    assert result.launched.progress.issued > 0
    assert result.redemption.discount_fen == 1000 and not result.redemption.replayed
    assert sum(arm.redeemed for arm in result.report.arms) == 1
    assert sum(arm.revenue_fen for arm in result.report.arms) > 0

    # The same data over HTTP/JSON, through the same gateway process.
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{processes.ports['http']}") as http:
        headers = {"X-Api-Key": key.secret}
        async with http.get(f"/v1/{result.campaign.name}/report", headers=headers) as response:
            assert response.status == 200
            report = await response.json()
        assert report["campaign"] == result.campaign.name
        async with http.get("/openapi.json") as response:
            assert "/v1/tenants/{tenant}/packs" in (await response.json())["paths"]

    # gateway -> audience: GetPackPersona.
    def persona_traced(index: dict[bytes, Span]) -> bool:
        return any(
            hop(index, g, "audience") for g in gateway_server_spans(index, "AudienceService/GetPackPersona")
        )

    index = await spans_until(processes, persona_traced)
    (gateway_span,) = gateway_server_spans(index, "AudienceService/GetPackPersona")
    assert gateway_span.attributes.get("flashcrowd.tenant") == "shop"
    ((client_span, audience_span),) = hop(index, gateway_span, "audience")
    assert child_of(client_span, gateway_span)
    assert audience_span.name.endswith("AudienceService/GetPackPersona")

    # gateway -> retarget -> audience: launching the campaign resolves its pack on the audience service.
    def launch_traced(index: dict[bytes, Span]) -> bool:
        for g in gateway_server_spans(index, "RetargetService/LaunchCampaign"):
            for _, retarget_span in hop(index, g, "retarget"):
                if hop(index, retarget_span, "audience"):
                    return True
        return False

    index = await spans_until(processes, launch_traced)
    (gateway_span,) = gateway_server_spans(index, "RetargetService/LaunchCampaign")
    ((client_span, retarget_span),) = hop(index, gateway_span, "retarget")
    assert child_of(client_span, gateway_span) and retarget_span.name.endswith(
        "RetargetService/LaunchCampaign"
    )
    audience_hops = hop(index, retarget_span, "audience")
    assert audience_hops, "retarget's calls to audience are not in the gateway's trace"
    for retarget_client, audience_server in audience_hops:
        assert retarget_client.trace_id == gateway_span.trace_id == audience_server.trace_id
        assert retarget_span in ancestors(retarget_client, index)

    processes.launch_trace = gateway_span.trace_id


async def test_launch_trace_is_one_tree(processes: Processes) -> None:
    """Every span of the launch trace descends from the gateway's server span (one tree, one root)."""
    trace_id = getattr(processes, "launch_trace", None)
    assert trace_id is not None, "run with test_seed_story_across_processes"

    def strays(index: dict[bytes, Span]) -> list[Span]:
        trace = [s for s in index.values() if s.trace_id == trace_id]
        roots = [s for s in trace if not s.parent_id]
        assert len(roots) == 1 and roots[0].service == "gateway"
        return [s for s in trace if s is not roots[0] and roots[0] not in ancestors(s, index)]

    # Spans of streams end (and are exported) when the stream is closed: give them a moment.
    index = await spans_until(processes, lambda index: not strays(index), seconds=5)
    assert not strays(index), [(s.service, s.name, s.parent_id.hex()) for s in strays(index)]
