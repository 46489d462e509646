"""LookalikeService over real gRPC against the real audience server (local store; one round trip on the
moto S3 server too): train, get, expand, refresh; every bad input with its code and field, nothing
written; and the batch CLI on the same store."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import polars as pl
import pytest
import pytest_asyncio
from flashcrowd.audience.v1 import (
    audience_service_pb2,
    events_pb2,
    lookalike_pb2,
    lookalike_pb2_grpc,
    pack_pb2,
    spec_pb2,
)
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2
from pyroaring import BitMap

from services.audience.lookalike import pipeline
from services.audience.lookalike.exclusion import FeatureExclusion
from services.audience.lookalike.jobs import LookalikeJobs, expansion_payload
from services.audience.lookalike.service import LOOKALIKE_SERVICE
from services.audience.server import AUDIENCE_SERVICE
from services.cli.main import main
from services.events.generator import GenConfig, generate
from services.runtime import FailedPrecondition, NotFound, error_details
from services.storage import LocalObjectStore, MinioObjectStore, ObjectStore, publish, read_manifest
from tests.audience.service.conftest import Service, start_service, stop_service
from tests.fixtures.channels import AS_TENANT
from tests.fixtures.s3server import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, s3_url, unique_bucket

WORLD = GenConfig(users=8_000, days=4, seed=5)
TENANT = "acme"


@dataclass
class Lookalike:
    svc: Service
    stub: lookalike_pb2_grpc.LookalikeServiceStub
    store_dir: Path | None
    model: lookalike_pb2.LookalikeModel
    buyers: pack_pb2.Pack  # seed pack of TENANT: purchasers of the whole data

    @property
    def store(self) -> ObjectStore:
        return self.svc.store

    async def expand(self, request: lookalike_pb2.ExpandLookalikeRequest, metadata=None):
        op = await self.stub.ExpandLookalike(request, metadata=metadata)
        return await self.svc.wait(op.name)

    def keys(self, prefix: str) -> list[str]:
        return [info.key for info in self.store.list(prefix)]


async def _setup(kind: str, store: ObjectStore, url: str, store_dir: Path | None) -> Lookalike:
    generate(store, WORLD)
    svc = await start_service(kind, store, url)
    stub = lookalike_pb2_grpc.LookalikeServiceStub(svc.channel)
    op = await stub.TrainLookalikeModel(
        lookalike_pb2.TrainLookalikeModelRequest(model_id="m1", cluster_count=16)
    )
    assert op.name.startswith("tenants/platform/operations/")
    op = await svc.wait(op.name)
    assert not op.HasField("error"), op.error
    model = lookalike_pb2.LookalikeModel()
    op.response.Unpack(model)
    buyers = await svc.create_pack(
        TENANT,
        spec_pb2.PackSpec(
            shortcut=spec_pb2.Shortcut(
                kind=spec_pb2.Shortcut.KIND_PURCHASERS,
                window=spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=30 * 86_400)),
            )
        ),
        pack_id="buyers",
    )
    return Lookalike(svc, stub, store_dir, model, buyers)


@pytest_asyncio.fixture(scope="module")
async def la(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lookalike]:
    root = tmp_path_factory.mktemp("lookalike-svc") / "store"
    service = await _setup("local", LocalObjectStore(root), root.as_uri(), root)
    try:
        yield service
    finally:
        await stop_service(service.svc)


def request(**kwargs) -> lookalike_pb2.ExpandLookalikeRequest:
    values = {
        "parent": f"tenants/{TENANT}",
        "seed_pack": f"tenants/{TENANT}/packs/buyers",
        "pack_id": f"lal-{uuid.uuid4().hex[:10]}",
        "reach_fraction": 0.05,
        "model": "lookalikeModels/m1",  # other tests add models; the default (newest) would move
    }
    values.update(kwargs)
    return lookalike_pb2.ExpandLookalikeRequest(**values)


async def test_train_get_expand_refresh(la: Lookalike) -> None:
    assert la.model.name == "lookalikeModels/m1" and la.model.algorithm == "MiniBatchKMeans"
    assert la.model.cluster_count == 16 and la.model.population_size == WORLD.users
    assert la.model.feature_schema.startswith("sha256:")
    got = await la.stub.GetLookalikeModel(lookalike_pb2.GetLookalikeModelRequest(name="lookalikeModels/m1"))
    assert got == la.model
    assert la.buyers.size >= 100

    req = request()
    op = await la.expand(req)
    assert not op.HasField("error"), op.error
    response = lookalike_pb2.ExpandLookalikeResponse()
    op.response.Unpack(response)
    pack = response.pack
    assert pack.name == f"tenants/{TENANT}/packs/{req.pack_id}" and pack.version == 1
    assert pack.size == round(0.05 * WORLD.users) and pack.source == pack_pb2.Pack.SOURCE_LOOKALIKE
    assert [(i.pack, i.version) for i in pack.inputs] == [(la.buyers.name, la.buyers.version)]
    assert response.seed_matched <= la.buyers.size and response.seed_matched >= 100
    assert 1 <= response.clusters_covered <= 16 and 0 < response.seed_concentration <= 1
    steps = {round(s.reach_fraction, 4): s for s in response.lift_curve}
    assert set(steps) == {0.01, 0.02, 0.05, 0.1}
    assert steps[0.05].size == 400 and steps[0.05].expected_lift > 1.0

    members, _ = la.svc.app.packs.load_bitmap(TENANT, req.pack_id)
    seed, _ = la.svc.app.packs.load_bitmap(TENANT, "buyers")
    assert len(members) == pack.size and not (members & seed)
    # The AudienceService sees the new pack like any other.
    shown = await la.svc.stub.GetPack(audience_service_pb2.GetPackRequest(name=pack.name))
    assert shown.size == pack.size and shown.source == pack_pb2.Pack.SOURCE_LOOKALIKE
    record = json.loads(la.store.get_bytes(f"lookalike/expansions/{TENANT}/{req.pack_id}/v000001.json"))
    assert (
        record["model"] == "lookalikeModels/m1" and record["stats"]["seed_matched"] == response.seed_matched
    )

    # Re-expanding into the same pack is its refresh: a new version.
    op = await la.expand(request(pack_id=req.pack_id, reach_size=123))
    refreshed = lookalike_pb2.ExpandLookalikeResponse()
    op.response.Unpack(refreshed)
    assert refreshed.pack.version == 2 and refreshed.pack.size == 123


async def test_exclusions_and_profile_constraints(la: Lookalike) -> None:
    first = request()
    op = await la.expand(first)
    assert not op.HasField("error"), op.error
    female = spec_pb2.ProfileFilter(genders=[spec_pb2.GENDER_FEMALE])
    second = request(
        reach_size=300, exclude_packs=[f"tenants/{TENANT}/packs/{first.pack_id}"], profile=female
    )
    # Through the gateway: the trusted tenant header names the same tenant.
    op = await la.expand(second, metadata=((AS_TENANT, TENANT),))
    assert not op.HasField("error"), op.error
    # The tenant reads its expansion's counts as disclosed (privacy.py); the platform exactly.
    as_tenant_op = await la.svc.ops.GetOperation(
        operations_pb2.GetOperationRequest(name=op.name), metadata=((AS_TENANT, TENANT),)
    )
    shown, exact = lookalike_pb2.ExpandLookalikeResponse(), lookalike_pb2.ExpandLookalikeResponse()
    as_tenant_op.response.Unpack(shown)
    op.response.Unpack(exact)
    assert exact.pack.size_disclosure == pack_pb2.SIZE_DISCLOSURE_EXACT and exact.pack.size == 300
    assert shown.pack.size_disclosure == pack_pb2.SIZE_DISCLOSURE_NOISY
    if exact.seed_matched < 100:  # below the reporting minimum: "fewer than 100"
        assert shown.seed_matched == 0
    else:  # Laplace(2) noise: far inside 40 with overwhelming odds
        assert abs(shown.seed_matched - exact.seed_matched) <= 40
    members, pack = la.svc.app.packs.load_bitmap(TENANT, second.pack_id)
    excluded, _ = la.svc.app.packs.load_bitmap(TENANT, first.pack_id)
    assert len(members) == 300 and not (members & excluded)
    profiles = la.svc.dataset.scan_profiles(["user_id", "gender"]).collect()
    genders = profiles.filter(pl.col("user_id").is_in(list(members)))["gender"].unique().to_list()
    assert genders == [1]
    assert pack.spec.profile.genders == [spec_pb2.GENDER_FEMALE]
    assert [i.pack for i in pack.inputs] == [la.buyers.name, f"tenants/{TENANT}/packs/{first.pack_id}"]


def _small_seed(la: Lookalike, pack_id: str, size: int) -> None:
    ids = np.arange(1, WORLD.users + 1, 7)[:size]
    la.svc.app.packs.publish_version(
        TENANT, pack_id, BitMap(ids.tolist()), pack_pb2.Pack(display_name="small")
    )


def _clone_model(la: Lookalike, model_id: str, **changes: object) -> None:
    source = "lookalike/models/m1/v1/"
    manifest = read_manifest(la.store, source + "manifest.json")
    for key in ("files", "published_at"):
        manifest.pop(key)
    manifest.update(changes, model_id=model_id)
    target = f"lookalike/models/{model_id}/v1/"
    publish(
        la.store,
        data={target + "centers.npy": la.store.get_bytes(source + "centers.npy")},
        manifest_key=target + "manifest.json",
        manifest=manifest,
    )


async def _fails(call, code: grpc.StatusCode, field: str | None = None, reason: str | None = None):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    details = error_details(info.value)
    assert details.code == code, details.message
    if field is not None:
        fields = [f for f, _ in details.field_violations] or [
            (details.error_info.metadata.get("field") if details.error_info else None)
        ]
        assert field in fields, (fields, details.message)
    if reason is not None:
        assert details.reason == reason, details.reason
    return details


async def test_bad_expansions_fail_and_write_nothing(la: Lookalike) -> None:
    _small_seed(la, "tiny", 60)
    _clone_model(la, "old-code", feature_version=0)
    la.svc.app.packs.publish_version(TENANT, "taken", BitMap([1, 2, 3]), pack_pb2.Pack())
    before = set(la.keys("packs/")) | set(la.keys("lookalike/expansions/"))
    invalid, missing, failed = (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    cases = [
        (request(seed_pack=f"tenants/{TENANT}/packs/tiny"), invalid, "seed_pack", "SEED_TOO_SMALL"),
        (request(reach_fraction=0.21), invalid, "reach_fraction", None),
        (request(reach_fraction=0.001), invalid, "reach_fraction", None),
        (request(reach_size=0), invalid, "reach_size", None),
        (request(reach_size=1_601), invalid, "reach_size", None),  # 20% of 8,000 is the most
        (lookalike_pb2.ExpandLookalikeRequest(parent=f"tenants/{TENANT}", seed_pack=la.buyers.name,
                                              pack_id="x"), invalid, "reach_fraction", None),
        (request(pack_id="Bad_Id"), invalid, "pack_id", None),
        (request(seed_pack=""), invalid, "seed_pack", None),
        (request(model="models/m1"), invalid, "model", None),
        (request(profile=spec_pb2.ProfileFilter(regions=["XX-YY"])), invalid, "profile.regions[0]", None),
        (request(seed_pack="tenants/other/packs/buyers"), missing, "seed_pack", "PACK_NOT_FOUND"),
        (request(seed_pack=f"tenants/{TENANT}/packs/nope"), missing, "seed_pack", "PACK_NOT_FOUND"),
        (request(exclude_packs=[f"tenants/{TENANT}/packs/nope"]), missing, "exclude_packs[0]", None),
        (request(model="lookalikeModels/nope"), missing, "model", "LOOKALIKE_MODEL_NOT_FOUND"),
        (request(model="lookalikeModels/old-code"), failed, "model", "FEATURE_SCHEMA_MISMATCH"),
        (request(reach_size=800, profile=spec_pb2.ProfileFilter(age_bands=[spec_pb2.AGE_BAND_UNDER_18],
                                                                 regions=["CN-XZ"])),
         failed, None, "NOT_ENOUGH_CANDIDATES"),
        (request(pack_id="taken"), grpc.StatusCode.ALREADY_EXISTS, "pack_id", None),
    ]  # fmt: skip
    for req, code, field, reason in cases:
        details = await _fails(la.stub.ExpandLookalike(req), code, field, reason)
        if reason == "SEED_TOO_SMALL":
            assert "60 members" in details.message and "at least 100" in details.message
        if reason == "FEATURE_SCHEMA_MISMATCH":
            assert details.precondition_failure.violations[0].subject == "lookalikeModels/old-code"
    # Another tenant's caller (gateway header) cannot use this tenant's seed, nor learn it exists.
    await _fails(
        la.stub.ExpandLookalike(request(), metadata=((AS_TENANT, "other"),)),
        grpc.StatusCode.NOT_FOUND,
    )
    assert set(la.keys("packs/")) | set(la.keys("lookalike/expansions/")) == before


async def test_bad_training_and_model_requests(la: Lookalike) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    train = lookalike_pb2.TrainLookalikeModelRequest
    await _fails(la.stub.TrainLookalikeModel(train(model_id="")), invalid, "model_id")
    await _fails(la.stub.TrainLookalikeModel(train(model_id="9lives")), invalid, "model_id")
    await _fails(
        la.stub.TrainLookalikeModel(train(model_id="ok", cluster_count=5000)), invalid, "cluster_count"
    )
    await _fails(la.stub.TrainLookalikeModel(train(model_id="ok", cluster_count=1)), invalid, "cluster_count")
    get = lookalike_pb2.GetLookalikeModelRequest
    await _fails(la.stub.GetLookalikeModel(get(name="m1")), invalid, "name")
    await _fails(la.stub.GetLookalikeModel(get(name="lookalikeModels/zzz")), grpc.StatusCode.NOT_FOUND)
    assert not la.keys("lookalike/models/ok/")


def test_no_model_maps_to_failed_precondition() -> None:
    error = pipeline.as_service_error(pipeline.NoModel(), "model")
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "NO_LOOKALIKE_MODEL"


async def test_served_with_health_and_reflection(la: Lookalike) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(la.svc.channel)
    for name in (LOOKALIKE_SERVICE, AUDIENCE_SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_cli_train_and_expand(la: Lookalike, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(la.store_dir)
    args = ["--store", store, "--root", "cli-lookalike/", "--json"]
    assert main(["lookalike", "train", "--model-id", "batch", "--clusters", "8", *args]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["name"] == "lookalikeModels/batch" and trained["cluster_count"] == 8
    expand = ["lookalike", "expand", "--tenant", TENANT, "--seed-pack", "buyers", "--pack-id", "cli-lal"]
    assert main([*expand, "--reach", "0.02", "--gender", "female", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["size"] == 160 and out["pack"] == f"tenants/{TENANT}/packs/cli-lal"
    members, pack = la.svc.app.packs.load_bitmap(TENANT, "cli-lal")
    assert len(members) == 160 and pack.source == pack_pb2.Pack.SOURCE_LOOKALIKE
    assert main([*expand, "--reach", "0.5", *args]) == 2
    assert "--reach" in capsys.readouterr().err
    assert main(["lookalike", "expand", "--tenant", TENANT, "--seed-pack", "tiny", "--pack-id", "x",
                 "--reach", "0.02", *args]) == 2  # fmt: skip
    assert "seed_pack" in capsys.readouterr().err


async def test_round_trip_on_s3(s3_server: str) -> None:
    bucket = unique_bucket("lal")
    store = MinioObjectStore(s3_server, S3_ACCESS_KEY, S3_SECRET_KEY, bucket, secure=False, region=S3_REGION)
    la = await _setup("s3", store, s3_url(s3_server, bucket), None)
    try:
        op = await la.expand(request(reach_size=200))
        assert not op.HasField("error"), op.error
        response = lookalike_pb2.ExpandLookalikeResponse()
        op.response.Unpack(response)
        assert response.pack.size == 200
        assert any(k.startswith("lookalike/features/") for k in la.keys("lookalike/"))
    finally:
        await stop_service(la.svc)


# --- issue 15: what an expansion reports, the seed's behaviour kept out, the model version pinned --


def _response(op) -> lookalike_pb2.ExpandLookalikeResponse:
    assert not op.HasField("error"), op.error
    response = lookalike_pb2.ExpandLookalikeResponse()
    op.response.Unpack(response)
    return response


async def test_response_names_model_blend_heldout_auc_tiers_and_lift_intervals(la: Lookalike) -> None:
    req = request(reach_fraction=0.05)
    response = _response(await la.expand(req))
    assert response.model == "lookalikeModels/m1" and response.model_version == 1
    assert 0.5 < response.heldout_auc <= 1.0
    b = response.blend
    assert b.cluster_weight + b.classifier_weight + b.activity_weight == pytest.approx(1.0) and b.rule
    assert [s.size for s in response.lift_curve] == [80, 160, 400, 800]  # the requested 5% listed once
    assert [s.requested for s in response.lift_curve] == [False, False, True, False]
    for step in response.lift_curve:
        assert not step.withheld_reason
        assert step.expected_lift_low <= step.expected_lift <= step.expected_lift_high
    assert [(t.start_fraction, t.end_fraction, t.size) for t in response.tiers] == [
        (0.0, 0.01, 80),
        (0.01, 0.02, 80),
        (0.02, 0.05, 240),
    ]
    assert sum(t.size for t in response.tiers) == response.pack.size
    # The seed is "purchasers": orders, payments, refunds were kept out of the features, automatically.
    purchase = [events_pb2.EVENT_TYPE_ORDER, events_pb2.EVENT_TYPE_PAY, events_pb2.EVENT_TYPE_REFUND]
    assert [list(e.event_types) for e in response.feature_exclusions] == [purchase]
    record = json.loads(la.store.get_bytes(f"lookalike/expansions/{TENANT}/{req.pack_id}/v000001.json"))
    assert record["feature_exclusion_sources"] == {"seed_spec": [{"event_types": [7, 8, 9]}]}
    assert record["feature_snapshot"].endswith(FeatureExclusion.from_json(record["feature_exclusion"]).key)
    assert record["model_version"] == 1 and record["model_version_reason"] == "newest"
    assert record["stats"]["heldout_auc"] == pytest.approx(response.heldout_auc, abs=1e-4)
    # A request's own exclusion is added to the seed's.
    views = lookalike_pb2.FeatureExclusion(event_types=[events_pb2.EVENT_TYPE_PRODUCT_VIEW], category_ids=[1])
    more = _response(await la.expand(request(reach_size=100, feature_exclusions=[views])))
    assert len(more.feature_exclusions) == 2 and more.pack.size == 100


async def test_refresh_keeps_the_model_version_unless_asked(la: Lookalike) -> None:
    train = lookalike_pb2.TrainLookalikeModelRequest
    for _ in range(2):  # versions 1 and 2 of a model of its own (other tests use m1's newest)
        op = await la.svc.wait((await la.stub.TrainLookalikeModel(train(model_id="pinned"))).name)
        assert not op.HasField("error"), op.error
    trained = lookalike_pb2.LookalikeModel()
    op.response.Unpack(trained)
    assert trained.version == 2 and trained.fit_count == 5 and trained.cluster_count == 64
    assert "sqrt" in trained.cluster_rule
    pack_id = f"pin-{uuid.uuid4().hex[:8]}"
    first = _response(
        await la.expand(request(pack_id=pack_id, model="lookalikeModels/pinned", model_version=1))
    )
    assert first.model_version == 1
    refreshed = _response(await la.expand(request(pack_id=pack_id, model="")))  # a refresh, no model named
    assert refreshed.pack.version == 2 and refreshed.model == "lookalikeModels/pinned"
    assert refreshed.model_version == 1  # pinned by the pack's previous expansion, not the newest (2)
    record = json.loads(la.store.get_bytes(f"lookalike/expansions/{TENANT}/{pack_id}/v000002.json"))
    assert record["model_version_reason"] == "pinned by v1 of the pack"
    newest = _response(await la.expand(request(pack_id=pack_id, model="", refresh_model=True)))
    assert newest.pack.version == 3 and newest.model_version == 2
    # A pinned version that is gone fails before anything is written, naming the way out.
    la.store.delete_prefix("lookalike/models/pinned/v2/")
    details = await _fails(
        la.stub.ExpandLookalike(request(pack_id=pack_id, model="")), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details.reason == "MODEL_VERSION_GONE" and "refresh_model" in details.message
    await _fails(
        la.stub.ExpandLookalike(request(model="lookalikeModels/pinned", model_version=7)),
        grpc.StatusCode.NOT_FOUND,
        "model_version",
    )


async def test_bad_exclusions_and_versions(la: Lookalike) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    empty = lookalike_pb2.FeatureExclusion()
    unknown = lookalike_pb2.FeatureExclusion(event_types=[99])
    await _fails(
        la.stub.ExpandLookalike(request(feature_exclusions=[empty])), invalid, "feature_exclusions[0]"
    )
    await _fails(
        la.stub.ExpandLookalike(request(feature_exclusions=[empty, unknown])),
        invalid,
        "feature_exclusions[1].event_types[0]",
    )
    await _fails(la.stub.ExpandLookalike(request(model_version=-1)), invalid, "model_version")
    train = lookalike_pb2.TrainLookalikeModelRequest(model_id="bad-x", feature_exclusions=[empty])
    await _fails(la.stub.TrainLookalikeModel(train), invalid, "feature_exclusions[0]")
    assert not la.keys("lookalike/models/bad-x/")


async def test_model_trained_without_a_behaviour(la: Lookalike) -> None:
    follows = lookalike_pb2.FeatureExclusion(event_types=[events_pb2.EVENT_TYPE_FOLLOW])
    op = await la.stub.TrainLookalikeModel(
        lookalike_pb2.TrainLookalikeModelRequest(
            model_id="no-follows", cluster_count=8, feature_exclusions=[follows]
        )
    )
    op = await la.svc.wait(op.name)
    assert not op.HasField("error"), op.error
    model = lookalike_pb2.LookalikeModel()
    op.response.Unpack(model)
    assert [list(e.event_types) for e in model.feature_exclusions] == [[events_pb2.EVENT_TYPE_FOLLOW]]
    assert model.cluster_rule == "fixed by the caller" and model.cluster_count == 8
    response = _response(await la.expand(request(model=model.name, reach_size=50)))
    kinds = sorted(tuple(e.event_types) for e in response.feature_exclusions)
    purchase = (events_pb2.EVENT_TYPE_ORDER, events_pb2.EVENT_TYPE_PAY, events_pb2.EVENT_TYPE_REFUND)
    assert kinds == [purchase, (events_pb2.EVENT_TYPE_FOLLOW,)]


@dataclass
class _Attempt:
    """What a portable runner reads of its ``JobContext``: the operation and which run this is."""

    operation: str
    attempt: int = 1

    def progress(self, stage: str | None = None, percent: float | None = None) -> None:
        return None


def _prepared_payload(la: Lookalike, seed_pack: str, pack_id: str) -> bytes:
    app = la.svc.app
    prepared = pipeline.prepare_expansion(
        la.store, "lookalike/", app.packs, app.servicer.dataset,
        pipeline.ExpandRequest(tenant=TENANT, pack_id=pack_id, seed_pack=seed_pack, model_id="m1",
                               reach_fraction=0.05),
        min_seed=100,
    )  # fmt: skip
    return expansion_payload(prepared, exclude_bots=True, min_seed=100)


def test_a_re_run_expansion_publishes_nothing_and_moved_inputs_are_refused(la: Lookalike) -> None:
    app = la.svc.app
    jobs = LookalikeJobs(la.store, app.packs, app.settings.dataset_prefix, "lookalike/")
    pack_id = f"lal-{uuid.uuid4().hex[:8]}"
    payload = _prepared_payload(la, "buyers", pack_id)
    op = f"tenants/{TENANT}/operations/{uuid.uuid4().hex}"
    first = jobs.expand(_Attempt(op), payload)
    assert first.pack.version == 1 and first.model_version == la.model.version
    # Its owner "died" after publishing: the second attempt answers the same and publishes nothing.
    again = jobs.expand(_Attempt(op, attempt=2), payload)
    assert again.pack == first.pack and list(again.lift_curve) == list(first.lift_curve)
    assert app.packs.get(TENANT, pack_id).version == 1
    # Inputs that moved between accepting and running: refused, nothing written.
    bitmap, _ = app.packs.load_bitmap(TENANT, "buyers")
    upload = pack_pb2.Pack(source=pack_pb2.Pack.SOURCE_UPLOAD)
    app.packs.publish_version(TENANT, "buyers-copy", bitmap, upload)
    moved = f"lal-{uuid.uuid4().hex[:8]}"
    payload = _prepared_payload(la, "buyers-copy", moved)
    app.packs.publish_version(TENANT, "buyers-copy", bitmap, upload)  # the seed moved on
    with pytest.raises(FailedPrecondition) as refused:
        jobs.expand(_Attempt(f"tenants/{TENANT}/operations/{uuid.uuid4().hex}"), payload)
    assert refused.value.reason == "INPUTS_CHANGED"
    with pytest.raises(NotFound):
        app.packs.get(TENANT, moved)
