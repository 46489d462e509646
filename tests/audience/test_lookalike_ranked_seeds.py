"""Issue 15 items 5-7 over real gRPC against the real audience server (local store): ranked results up
to 20% reach and the platform's scored export, negative and value-weighted seeds, seeds from a
platform user-id upload, the per-request minimum seed down to the platform floor, and the refresh
scheduler (interval and new seed versions, same model version, manual policies) with its CLI."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
import polars as pl
import pytest
import pytest_asyncio
from flashcrowd.audience.v1 import audience_service_pb2 as api
from flashcrowd.audience.v1 import lookalike_pb2, pack_pb2, spec_pb2
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2

from services.audience.lookalike.ranking import RankingParams, rank_population
from services.audience.lookalike.refresh import due_refreshes, run_refreshes
from services.audience.lookalike.seed_weights import spend_weights
from services.cli.main import main
from services.events.schema import EventType
from services.storage import LocalObjectStore
from tests.audience.service.conftest import stop_service
from tests.audience.test_lookalike_service import (
    TENANT,
    WORLD,
    Lookalike,
    _fails,
    _setup,
    _small_seed,
    request,
)
from tests.fixtures.channels import AS_TENANT

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest_asyncio.fixture(scope="module")
async def la(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lookalike]:
    root = tmp_path_factory.mktemp("lookalike-ranked") / "store"
    service = await _setup("local", LocalObjectStore(root), root.as_uri(), root)
    try:
        yield service
    finally:
        await stop_service(service.svc)


async def _expand(la: Lookalike, req: lookalike_pb2.ExpandLookalikeRequest, metadata=None):
    op = await la.expand(req, metadata=metadata)
    assert not op.HasField("error"), op.error
    response = lookalike_pb2.ExpandLookalikeResponse()
    op.response.Unpack(response)
    return response


async def _export(la: Lookalike, **kwargs) -> list[lookalike_pb2.ExportLookalikeScoresResponse]:
    call = la.stub.ExportLookalikeScores(lookalike_pb2.ExportLookalikeScoresRequest(**kwargs))
    return [page async for page in call]


# --- ranked result: tiers to 20%, scored export --------------------------------------------------


async def test_reach_up_to_20_percent_in_tiers_and_the_scored_export(la: Lookalike) -> None:
    req = request(reach_fraction=0.15)
    response = await _expand(la, req)
    n = WORLD.users
    assert response.pack.size == round(0.15 * n)
    bounds = [(round(t.start_fraction, 4), round(t.end_fraction, 4), t.size) for t in response.tiers]
    assert bounds == [
        (0.0, 0.01, 80),
        (0.01, 0.02, 80),
        (0.02, 0.05, 240),
        (0.05, 0.1, 400),
        (0.1, 0.15, 400),
    ]
    steps = [(round(s.reach_fraction, 4), s.requested) for s in response.lift_curve]
    assert steps == [(0.01, False), (0.02, False), (0.05, False), (0.1, False), (0.15, True)]  # no 20%

    pages = await _export(la, name=response.pack.name, page_size=500)
    assert [p.exported for p in pages] == [500, 1000, 1200] and {p.total for p in pages} == {1200}
    assert [len(p.tiers) for p in pages] == [5, 0, 0] and pages[0].version == 1
    members = [m for p in pages for m in p.members]
    assert [m.rank for m in members] == list(range(1200))
    tiers = [m.tier for m in members]
    assert tiers == sorted(tiers) and np.bincount(tiers).tolist() == [80, 80, 240, 400, 400]
    scores = [m.score for m in members]
    assert scores == sorted(scores, reverse=True)  # best first
    stored, _ = la.svc.app.packs.load_bitmap(TENANT, req.pack_id)
    assert {m.user_id for m in members} == set(stored)
    best = await _export(la, name=response.pack.name, max_tier=1)
    assert [m.user_id for p in best for m in p.members] == [m.user_id for m in members[:160]]

    # A reach of 20% is the most (Meta's), and then 20% is a step and a tier.
    widest = await _expand(la, request(reach_fraction=0.20))
    assert [round(t.end_fraction, 4) for t in widest.tiers][-1] == 0.2
    assert [s.requested for s in widest.lift_curve if round(s.reach_fraction, 4) == 0.2] == [True]


async def test_scored_export_is_member_level_and_checked(la: Lookalike) -> None:
    response = await _expand(la, request(reach_size=100))
    name = response.pack.name
    export = lookalike_pb2.ExportLookalikeScoresRequest

    async def drain(req, metadata=None):
        return [p async for p in la.stub.ExportLookalikeScores(req, metadata=metadata)]

    # Tenants see tier sizes (in the response), never members.
    await _fails(
        drain(export(name=name), metadata=((AS_TENANT, TENANT),)),
        grpc.StatusCode.PERMISSION_DENIED,
        reason="PLATFORM_SCOPE_REQUIRED",
    )
    await _fails(drain(export(name=name, page_size=100_001)), INVALID, "page_size")
    await _fails(drain(export(name=name, version=-1)), INVALID, "version")
    await _fails(drain(export(name=name, max_tier=-1)), INVALID, "max_tier")
    await _fails(drain(export(name="packs/x")), INVALID, "name")
    await _fails(drain(export(name=la.buyers.name)), INVALID, "name", "NOT_A_LOOKALIKE")
    await _fails(drain(export(name=f"tenants/{TENANT}/packs/nope")), grpc.StatusCode.NOT_FOUND)
    await _fails(drain(export(name=name, version=9)), grpc.StatusCode.NOT_FOUND)


# --- minimum seed per request ----------------------------------------------------------------------


async def test_minimum_seed_lowered_per_request_down_to_the_floor(la: Lookalike) -> None:
    _small_seed(la, "sixty", 60)
    seed = f"tenants/{TENANT}/packs/sixty"
    await _fails(la.stub.ExpandLookalike(request(seed_pack=seed)), INVALID, "seed_pack", "SEED_TOO_SMALL")
    await _fails(la.stub.ExpandLookalike(request(seed_pack=seed, min_seed_size=10)), INVALID, "min_seed_size")
    await _fails(
        la.stub.ExpandLookalike(request(seed_pack=seed, min_seed_size=61)),
        INVALID,
        "seed_pack",
        "SEED_TOO_SMALL",
    )
    response = await _expand(la, request(seed_pack=seed, min_seed_size=50))
    assert response.min_seed_size == 50 and response.pack.size == 400
    # The honest-lift rule still holds: 30-member halves say nothing, so every step is withheld.
    assert response.lift_curve and all(
        s.withheld_reason and s.expected_lift == 0 for s in response.lift_curve
    )
    default = await _expand(la, request())
    assert default.min_seed_size == 100


# --- negative and value-weighted seeds -----------------------------------------------------------


async def test_negative_seed_members_are_never_selected(la: Lookalike) -> None:
    first = await _expand(la, request(reach_fraction=0.05))
    negative = first.pack.name
    second = await _expand(la, request(reach_fraction=0.05, negative_seed_packs=[negative]))
    a, _ = la.svc.app.packs.load_bitmap(TENANT, first.pack.name.rsplit("/", 1)[-1])
    b, pack = la.svc.app.packs.load_bitmap(TENANT, second.pack.name.rsplit("/", 1)[-1])
    assert len(b) == 400 and not (a & b)
    assert second.negative_matched == len(a) == 400
    # The tenant reads that count as disclosed (noisy, like seed_matched), the platform exactly.
    ops = await la.svc.ops.ListOperations(
        operations_pb2.ListOperationsRequest(name=f"tenants/{TENANT}/operations"),
        metadata=((AS_TENANT, TENANT),),
    )
    shown = lookalike_pb2.ExpandLookalikeResponse()
    for op in ops.operations:
        if op.response.Is(lookalike_pb2.ExpandLookalikeResponse.DESCRIPTOR):
            op.response.Unpack(shown)
            if shown.pack.name == second.pack.name:
                break
    assert (
        shown.pack.name == second.pack.name and shown.pack.size_disclosure == pack_pb2.SIZE_DISCLOSURE_NOISY
    )
    assert abs(shown.negative_matched - 400) <= 40  # Laplace(2): far inside 40 with overwhelming odds
    assert [i.pack for i in pack.inputs] == [la.buyers.name, negative]
    await _fails(
        la.stub.ExpandLookalike(request(negative_seed_packs=[f"tenants/{TENANT}/packs/nope"])),
        grpc.StatusCode.NOT_FOUND,
        "negative_seed_packs[0]",
    )
    await _fails(
        la.stub.ExpandLookalike(request(negative_seed_packs=["tenants/other/packs/buyers"])),
        grpc.StatusCode.NOT_FOUND,
        "negative_seed_packs[0]",
    )


async def test_spend_weighted_seed(la: Lookalike) -> None:
    response = await _expand(la, request(seed_weighting=lookalike_pb2.SEED_WEIGHTING_SPEND))
    assert response.seed_weighting == lookalike_pb2.SEED_WEIGHTING_SPEND and response.pack.size == 400
    pack_id = response.pack.name.rsplit("/", 1)[-1]
    record = json.loads(la.store.get_bytes(f"lookalike/expansions/{TENANT}/{pack_id}/v000001.json"))
    assert record["seed_weighting"] == "spend" and "members paid" in record["seed_weighting_note"]
    await _fails(la.stub.ExpandLookalike(request(seed_weighting=7)), INVALID, "seed_weighting")


def test_spend_weights_follow_net_spend(la: Lookalike) -> None:
    seed, _ = la.svc.app.packs.load_bitmap(TENANT, "buyers")
    ids = np.asarray(seed.to_array(), np.uint32)
    dataset = la.svc.dataset
    weights = spend_weights(dataset, TENANT, ids, dataset.end)
    # An independent sum of the same events: pay minus refund per member, clipped at 0.
    events = (
        dataset.scan_events(columns=["user_id", "event_type", "amount_fen"])
        .filter(pl.col("event_type").is_in([int(EventType.PAY), int(EventType.REFUND)]))
        .collect()
    )
    signed = (
        np.where(events["event_type"].to_numpy() == int(EventType.PAY), 1, -1)
        * events["amount_fen"].to_numpy()
    )
    net = (
        pl.DataFrame({"user_id": events["user_id"].cast(pl.UInt32), "net": signed}).group_by("user_id").sum()
    )
    spend = dict(zip(net["user_id"].to_list(), net["net"].to_list(), strict=True))
    expected = np.array([max(spend.get(int(u), 0), 0) for u in ids], np.float64)
    assert weights.paying == int((expected > 0).sum()) > 0
    assert np.allclose(weights.weights, np.clip(expected / expected.mean(), 0.1, 10.0))


def _ensemble(x: np.ndarray, k: int = 8) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=1, random_state=0).fit(x).cluster_centers_[None, :, :].astype(np.float32)


def test_negatives_and_weights_move_the_classifier() -> None:
    rng = np.random.default_rng(3)
    n = 6_000
    x = rng.normal(size=(n, 4)).astype(np.float32)
    ids = np.arange(n, dtype=np.uint32)
    activity = np.ones(n)
    seed = ids[x[:, 0] > 1.0]
    ensemble = _ensemble(x)
    params = RankingParams(fixed_blend=(0.0, 1.0, 0.0))

    def scores(**kwargs) -> np.ndarray:
        ranking = rank_population(ensemble, lambda: iter([(ids, x.copy(), activity)]), seed, params, **kwargs)
        return ranking.scores["all"]

    def mean_percentile(score: np.ndarray, who: np.ndarray) -> float:
        order = np.argsort(np.argsort(score))
        return float(order[who].mean() / n)

    plain = scores()
    # Negatives: users high on column 1; half are taught, the other half must still move down.
    high1 = np.flatnonzero((x[:, 1] > 1.0) & (x[:, 0] <= 1.0))
    taught, held = high1[::2], high1[1::2]
    away = scores(negative_ids=ids[taught])
    assert mean_percentile(away, held) < mean_percentile(plain, held) - 0.02
    # Weights: seed members high on column 2 count 10x; non-seed users high on column 2 move up.
    w = np.where(x[seed, 2] > 0.5, 10.0, 1.0)
    weighted = scores(seed_weights=w)
    high2 = np.flatnonzero((x[:, 2] > 0.5) & (x[:, 0] <= 1.0))
    assert mean_percentile(weighted, high2) > mean_percentile(plain, high2) + 0.02


# --- seeds from a platform user-id upload ----------------------------------------------------------


def _user_id_upload(pack_id: str, ids: list[int], **header) -> list[api.UploadPackRequest]:
    head = api.UploadPackHeader(
        parent=f"tenants/{TENANT}", pack_id=pack_id, id_type=api.ID_TYPE_USER_ID, **header
    )
    return [
        api.UploadPackRequest(header=head),
        api.UploadPackRequest(chunk=api.UploadPackChunk(user_ids=ids[:100])),
        api.UploadPackRequest(chunk=api.UploadPackChunk(user_ids=ids[100:])),
    ]


async def _stream(messages):
    for m in messages:
        yield m


async def test_seed_from_a_platform_user_id_upload(la: Lookalike) -> None:
    known = list(range(5, 5 + 7 * 150, 7))  # 150 users of the world (ids 1..8000)
    rows = [*known, known[0], 2**40, 10**9]  # a duplicate, an id no uint32 holds, an unknown user
    reply = await la.svc.stub.UploadPack(_stream(_user_id_upload("crm-ids", rows)))
    stats = reply.stats
    assert (stats.received, stats.valid, stats.invalid, stats.duplicates, stats.matched) == (
        153,
        152,
        1,
        1,
        150,
    )
    assert [(r.index, "platform user id" in r.reason) for r in reply.invalid_rows] == [(151, True)]
    members, pack = la.svc.app.packs.load_bitmap(TENANT, "crm-ids")
    assert set(members) == set(known) and pack.source == pack_pb2.Pack.SOURCE_UPLOAD
    # Identity maps are empty after an import: the user-id seed still expands.
    response = await _expand(la, request(seed_pack=pack.name))
    assert response.seed_matched == 150 and response.pack.size == 400

    # Tenants hold no platform user ids; a hash type makes no sense for them; rows go in user_ids.
    await _fails(
        la.svc.stub.UploadPack(_stream(_user_id_upload("t-ids", known)), metadata=((AS_TENANT, TENANT),)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await _fails(
        la.svc.stub.UploadPack(_stream(_user_id_upload("h-ids", known, hash_type=api.HASH_TYPE_SHA256))),
        INVALID,
        "header.hash_type",
    )
    wrong = _user_id_upload("w-ids", known)
    wrong[1] = api.UploadPackRequest(chunk=api.UploadPackChunk(hashed_ids=["ab" * 32]))
    await _fails(la.svc.stub.UploadPack(_stream(wrong)), INVALID, "chunk.hashed_ids")
    for pack_id in ("t-ids", "h-ids", "w-ids"):
        assert not la.svc.app.packs.exists(TENANT, pack_id)


# --- refresh -------------------------------------------------------------------------------------


async def test_refresh_on_interval_and_new_seed_version_with_the_same_model(la: Lookalike) -> None:
    spec = spec_pb2.PackSpec(
        shortcut=spec_pb2.Shortcut(
            kind=spec_pb2.Shortcut.KIND_PURCHASERS,
            window=spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=30 * 86_400)),
        )
    )
    seed = await la.svc.create_pack(TENANT, spec, pack_id="refresh-seed")
    daily = lookalike_pb2.LookalikeRefreshPolicy(interval=duration_pb2.Duration(seconds=86_400))
    auto = await _expand(la, request(seed_pack=seed.name, pack_id="auto-lal", refresh_policy=daily))
    manual_policy = lookalike_pb2.LookalikeRefreshPolicy(manual=True)
    manual = await _expand(
        la, request(seed_pack=seed.name, pack_id="manual-lal", refresh_policy=manual_policy)
    )
    assert auto.seed_pack_version == seed.version and auto.HasField("next_refresh_time")
    assert not manual.HasField("next_refresh_time")
    expanded_at = auto.pack.update_time.ToDatetime(UTC)
    assert abs(auto.next_refresh_time.ToDatetime(UTC) - expanded_at - timedelta(days=1)) < timedelta(
        seconds=1
    )
    await _fails(
        la.stub.ExpandLookalike(
            request(
                refresh_policy=lookalike_pb2.LookalikeRefreshPolicy(
                    interval=duration_pb2.Duration(seconds=60)
                )
            )
        ),
        INVALID,
        "refresh_policy.interval",
    )
    store, packs = la.store, la.svc.app.packs

    def due_names(now: datetime) -> dict[str, tuple[str, ...]]:
        due, _skipped = due_refreshes(store, "lookalike/", packs, now)
        return {d.pack_id: d.reasons for d in due if d.pack_id in ("auto-lal", "manual-lal")}

    now = datetime.now(UTC)
    assert due_names(now) == {}
    later = due_names(now + timedelta(days=1, minutes=1))
    assert list(later) == ["auto-lal"] and later["auto-lal"][0].startswith("interval")

    # A new version of the seed pack makes it due at once (not the manual one).
    op = await la.svc.stub.RefreshPack(api.RefreshPackRequest(name=seed.name))
    assert not (await la.svc.wait(op.name)).HasField("error")
    assert packs.latest_version(TENANT, "refresh-seed") == seed.version + 1
    reasons = due_names(now)
    assert list(reasons) == ["auto-lal"]
    assert reasons["auto-lal"] == (f"seed: {seed.name} v{seed.version} -> v{seed.version + 1}",)

    # The refresh: the CLI (the CronJob's command) lists and then runs it; same model version.
    assert la.store_dir is not None
    base = ["lookalike", "refresh", "--store", str(la.store_dir), "--json"]
    assert main([*base, "--dry-run"]) == 0
    assert main(base) == 0
    refreshed, pack = packs.load_bitmap(TENANT, "auto-lal")
    assert pack.version == 2 and len(refreshed) == 400
    assert [(i.pack, i.version) for i in pack.inputs] == [(seed.name, seed.version + 1)]
    first = json.loads(store.get_bytes(f"lookalike/expansions/{TENANT}/auto-lal/v000001.json"))
    second = json.loads(store.get_bytes(f"lookalike/expansions/{TENANT}/auto-lal/v000002.json"))
    assert (second["model"], second["model_version"]) == (first["model"], first["model_version"])
    assert second["model_version_reason"] == "pinned by v1 of the pack"
    assert second["seed_pack_version"] == seed.version + 1 and second["refresh"]["interval_seconds"] == 86_400
    assert packs.latest_version(TENANT, "manual-lal") == 1
    assert due_names(now) == {}  # nothing left due: a re-run does nothing


def test_refresh_failures_are_reported_per_pack(la: Lookalike) -> None:
    due, _ = due_refreshes(la.store, "lookalike/", la.svc.app.packs, datetime.now(UTC) + timedelta(days=30))
    assert due
    # A model that does not exist (say, deleted): this pack fails loudly, the next one refreshes.
    broken = replace(due[0], request=replace(due[0].request, model_id="nope"))
    outcomes = run_refreshes(
        la.store, "lookalike/", la.svc.app.packs, lambda: la.svc.dataset, [broken, due[1]], min_seed=100
    )
    assert [o.status for o in outcomes] == ["failed", "refreshed"]
    assert "lookalikeModels/nope" in outcomes[0].detail


def test_cli_training_shows_progress_in_job_logs(la: Lookalike, capsys: pytest.CaptureFixture[str]) -> None:
    # Not a terminal (a Job's log): one line per stage and per 10%, on stderr; stdout keeps the result.
    args = ["--store", str(la.store_dir), "--root", "progress-lookalike/"]
    assert (
        main(["lookalike", "train", "--model-id", "progress", "--clusters", "4", "--fits", "2", *args]) == 0
    )
    captured = capsys.readouterr()
    stages = [line.split()[0] for line in captured.err.splitlines()]
    for stage in ("features", "fit", "score", "publish"):
        assert stage in stages, captured.err
    assert stages.index("features") < stages.index("fit") < stages.index("publish")
    assert "lookalikeModels/progress v1" in captured.out


def test_cli_expand_with_negative_and_spend_weighted_seed(
    la: Lookalike, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--store", str(la.store_dir), "--json"]
    base = ["lookalike", "expand", "--tenant", TENANT, "--seed-pack", "buyers", "--model", "m1"]
    assert main([*base, "--pack-id", "cli-away", "--reach", "0.02", *args]) == 0
    capsys.readouterr()
    argv = [
        *base,
        "--pack-id",
        "cli-both",
        "--reach",
        "0.02",
        "--negative-pack",
        "cli-away",
        "--weight-by-spend",
    ]
    assert main([*argv, *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["negative_matched"] == 160 and out["weighted_seed"] is True and out["size"] == 160
    away, _ = la.svc.app.packs.load_bitmap(TENANT, "cli-away")
    both, _ = la.svc.app.packs.load_bitmap(TENANT, "cli-both")
    assert not (away & both)
    assert main([*base, "--pack-id", "cli-x", "--reach", "0.02", "--negative-pack", "Bad Id", *args]) == 2
