"""The lookalike step of the flash-sale demo: expand the sale's purchasers to 5% and compare personas.

``await lookalike_step(channel, tenant="tenants/demo-shop", seed_pack="tenants/demo-shop/packs/purchasers")``
drives the audience server over a real channel the way a caller would: TrainLookalikeModel (an
operation), ExpandLookalike (an operation), then GetPackPersona of the seed and of the lookalike,
printed side by side (share and TGI per value), with the expected-lift curve.
"""

from __future__ import annotations

from typing import TypeVar

import grpc
from flashcrowd.audience.v1 import (
    audience_service_pb2,
    audience_service_pb2_grpc,
    lookalike_pb2,
    lookalike_pb2_grpc,
    pack_pb2,
)
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message

__all__ = ["lookalike_step"]


M = TypeVar("M", bound=Message)


async def _wait(ops: operations_pb2_grpc.OperationsStub, op: operations_pb2.Operation, out: M) -> M:
    while not op.done:
        op = await ops.WaitOperation(
            operations_pb2.WaitOperationRequest(name=op.name, timeout=duration_pb2.Duration(seconds=30))
        )
    if op.HasField("error"):
        raise RuntimeError(f"{op.name} failed: {op.error.message}")
    op.response.Unpack(out)
    return out


async def lookalike_step(
    channel: grpc.aio.Channel,
    *,
    tenant: str,
    seed_pack: str,
    pack_id: str = "purchasers-lookalike-5",
    reach_fraction: float = 0.05,
    model_id: str = "demo",
    clusters: int = 0,  # 0: chosen from the population
    title: str = "Lookalike",
) -> lookalike_pb2.ExpandLookalikeResponse:
    from services.demo import render
    from services.events.schema import EventType

    lookalike = lookalike_pb2_grpc.LookalikeServiceStub(channel)
    audience = audience_service_pb2_grpc.AudienceServiceStub(channel)
    ops = operations_pb2_grpc.OperationsStub(channel)
    render.section(title, f"expand {seed_pack.rsplit('/', 1)[-1]} to {reach_fraction:.0%} of the population")
    model = await _wait(
        ops,
        await lookalike.TrainLookalikeModel(
            lookalike_pb2.TrainLookalikeModelRequest(model_id=model_id, cluster_count=clusters)
        ),
        lookalike_pb2.LookalikeModel(),
    )
    render.note(
        f"model {model.name} v{model.version}: {model.algorithm}, k={model.cluster_count} x "
        f"{model.fit_count} fits, {model.population_size:,} users, features {model.feature_snapshot}"
    )
    response = await _wait(
        ops,
        await lookalike.ExpandLookalike(
            lookalike_pb2.ExpandLookalikeRequest(
                parent=tenant,
                seed_pack=seed_pack,
                pack_id=pack_id,
                reach_fraction=reach_fraction,
                model=model.name,
            )
        ),
        lookalike_pb2.ExpandLookalikeResponse(),
    )
    render.note(
        f"{response.pack.name}: {response.pack.size:,} users (seed excluded); seed {response.seed_matched:,} "
        f"in {response.clusters_covered} of {model.cluster_count} clusters, "
        f"{response.seed_concentration:.0%} of it in the top 10% of clusters"
    )
    b = response.blend
    excluded = "; ".join(
        "/".join(EventType(t).label for t in e.event_types)
        + (f" in categories {list(e.category_ids)}" if e.category_ids else "")
        for e in response.feature_exclusions
    )
    render.note(
        f"{response.model} v{response.model_version}; ranking = cluster {b.cluster_weight:.2f}, classifier "
        f"{b.classifier_weight:.2f}, activity {b.activity_weight:.2f} ({b.rule}); held-out seed AUC "
        f"{response.heldout_auc:.3f}; features without {excluded or 'nothing'} (the seed's behaviour)"
    )
    render.table(
        "expected lift over random (held-out halves of the seed, 95% interval)",
        ["reach", "users", "lift", "interval"],
        [
            (
                f"{s.reach_fraction:.0%}",
                s.size,
                "withheld" if s.withheld_reason else f"{s.expected_lift:.2f}x",
                s.withheld_reason or f"{s.expected_lift_low:.2f}-{s.expected_lift_high:.2f}x",
            )
            for s in response.lift_curve
        ],
    )
    personas: list[pack_pb2.PackPersona | None] = []
    for name in (seed_pack, response.pack.name):
        try:
            personas.append(
                await audience.GetPackPersona(audience_service_pb2.GetPackPersonaRequest(name=name, top_n=5))
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            render.note(f"persona of {name.rsplit('/', 1)[-1]} withheld: {error.details()}")
            personas.append(None)
    seed, look = personas
    if look is None:
        return response
    seed_by_dim = {d.dimension: {b.value: b for b in d.buckets} for d in seed.dimensions} if seed else {}
    for dim in look.dimensions:
        mine = seed_by_dim.get(dim.dimension, {})
        theirs = {b.value: b for b in dim.buckets}
        values = list(mine) + [v for v in theirs if v not in mine]
        rows = []
        for value in values:
            sb, lb = mine.get(value), theirs.get(value)
            population = lb.population_share if lb else sb.population_share if sb else 0.0
            rows.append(
                (
                    value,
                    f"{population:.1%}",
                    f"{sb.share:.1%}" if sb else "-",
                    f"{sb.tgi:.0f}" if sb else "-",
                    f"{lb.share:.1%}" if lb else "-",
                    f"{lb.tgi:.0f}" if lb else "-",
                )
            )
        seed_size = f"{seed.size:,}" if seed else "withheld"
        render.table(
            f"{dim.dimension}: seed ({seed_size}) vs lookalike ({look.size:,})",
            ["value", "population", "seed share", "seed TGI", "lookalike share", "lookalike TGI"],
            rows,
        )
    return response
