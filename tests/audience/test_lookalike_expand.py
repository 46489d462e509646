"""Lookalike model and expansion on a generated world with latent segments: save/reload, exact reach,
exclusions, lift over random when the seed is one segment, and the failure cases (domain level)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from services.audience.lookalike import pipeline
from services.audience.lookalike.blend import choose_blend, delong_placements, simplex_grid
from services.audience.lookalike.expand import (
    ExpandError,
    NotEnoughCandidates,
    expand,
    resolve_reach,
)
from services.audience.lookalike.features import FeatureSnapshot, build_snapshot
from services.audience.lookalike.lift import reach_steps, wilson
from services.audience.lookalike.model import (
    LookalikeModel,
    default_cluster_count,
    latest_model_id,
    list_model_ids,
    load_model,
    train_model,
)
from services.audience.lookalike.ranking import RankingParams, rank_in_memory
from services.events.dataset import EventDataset
from services.events.generator import GenConfig, generate
from services.storage import LocalObjectStore, ObjectStore, publish, read_manifest

SEGMENTED = GenConfig(users=20_000, days=6, seed=3)
ROOT = "lookalike/"


@dataclass
class Trained:
    store: ObjectStore
    dataset: EventDataset
    snapshot: FeatureSnapshot
    model: LookalikeModel
    segments: pl.DataFrame  # user_id, segment (ground truth)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    store = LocalObjectStore(tmp_path_factory.mktemp("lookalike") / "store")
    generate(store, SEGMENTED)
    dataset = EventDataset(store)
    model, snapshot = pipeline.train(store, dataset, model_id="m1", clusters=32)
    segments = dataset.scan_truth(["user_id", "segment", "is_bot"]).collect()
    return Trained(store, dataset, snapshot, model, segments)


def segment_seed(t: Trained, segment: int, size: int, seed: int = 0) -> np.ndarray:
    members = t.segments.filter((pl.col("segment") == segment) & ~pl.col("is_bot"))["user_id"].to_numpy()
    return np.sort(np.random.default_rng(seed).choice(members, size, replace=False)).astype(np.uint32)


def test_model_save_reload_and_versions(trained: Trained) -> None:
    t = trained
    again = load_model(t.store, ROOT, "m1")
    assert again.version == 1 and np.array_equal(again.centers, t.model.centers)
    assert again.schema == t.snapshot.schema and again.feature_schema == t.snapshot.fingerprint
    assert again.feature_snapshot == t.snapshot.snapshot_id and again.population == SEGMENTED.users
    _ids, raw = t.snapshot.read_shard(t.snapshot.shard_keys()[0])
    x = again.transform(raw)
    assert np.array_equal(again.assign(x)[0], t.model.assign(x)[0])
    # Nearest centre = what sklearn's KMeans.predict would say.
    d = ((x[:, None, :] - again.centers[None, :, :]) ** 2).sum(axis=2)
    assert np.array_equal(again.assign(x)[0], d.argmin(axis=1))
    sizes = np.array(again.manifest["cluster_sizes"])
    assert sizes.sum() == SEGMENTED.users and (sizes > 0).sum() >= 24

    second = train_model(t.store, t.snapshot, model_id="m1", clusters=8, root=ROOT)
    assert second.version == 2 and load_model(t.store, ROOT, "m1").cluster_count == 8
    assert load_model(t.store, ROOT, "m1", version=1).cluster_count == 32
    other = train_model(t.store, t.snapshot, model_id="other", clusters=4, root=ROOT)
    assert latest_model_id(t.store, ROOT) == "other" and list_model_ids(t.store, ROOT) == ["m1", "other"]
    assert other.created >= second.created


def test_reach_is_exact_and_exclusions_hold(trained: Trained) -> None:
    t, n = trained, SEGMENTED.users
    seed = segment_seed(t, 2, 400)
    result = expand(t.model, t.snapshot, seed, reach_fraction=0.05)
    assert len(result.members) == round(0.05 * n) == result.requested
    assert not np.isin(result.members, seed).any()  # the seed is excluded by default
    assert len(np.unique(result.members)) == len(result.members)

    sized = expand(t.model, t.snapshot, seed, reach_size=777)
    assert len(sized.members) == 777
    again = expand(t.model, t.snapshot, seed, reach_size=777)
    assert np.array_equal(again.members, sized.members)  # deterministic

    exclude = result.members[:300]
    allowed = np.arange(1, n + 1, 2, dtype=np.uint32)  # odd ids only, like a profile constraint would
    constrained = expand(t.model, t.snapshot, seed, reach_fraction=0.05, exclude=exclude, allowed=allowed)
    assert len(constrained.members) == 1000
    assert not np.isin(constrained.members, exclude).any() and (constrained.members % 2 == 1).all()

    with_seed = expand(t.model, t.snapshot, seed, reach_fraction=0.10, include_seed=True)
    assert np.isin(seed, with_seed.members).mean() > 0.25  # seed members rank high (10% would be random)


def test_seed_of_one_segment_is_found(trained: Trained) -> None:
    """The property the product promises: a lookalike of one latent segment is mostly that segment."""
    t = trained
    truth = dict(zip(t.segments["user_id"].to_list(), t.segments["segment"].to_list(), strict=True))
    for segment in (2, 3, 6):  # fashion fans, tech buyers, live loyalists
        seed = segment_seed(t, segment, 300, seed=segment)
        result = expand(t.model, t.snapshot, seed, reach_fraction=0.05)
        population = t.segments.filter(~pl.col("user_id").is_in(seed))
        base = (population["segment"] == segment).mean()
        precision = np.mean([truth[int(u)] == segment for u in result.members])
        lift = precision / base
        assert lift > 1.5, (segment, lift, precision, base)
        # The estimate from held-out seed halves agrees that this expansion is far better than random.
        by_reach = {s.reach_fraction: s.lift for s in result.lift_curve}
        assert by_reach[0.05] > 1.5
        assert result.seed_matched == 300 and 1 <= result.clusters_covered <= 32
        assert 0 < result.seed_concentration <= 1


def test_bad_requests(trained: Trained) -> None:
    t = trained
    small = segment_seed(t, 2, 99)
    with pytest.raises(ExpandError) as info:
        expand(t.model, t.snapshot, small, reach_fraction=0.05)
    assert info.value.field == "seed_pack"
    assert "99 members" in info.value.description and "minimum is 100" in info.value.description
    outsiders = np.arange(10_000_000, 10_000_500, dtype=np.uint32)  # not in the model's population
    with pytest.raises(ExpandError, match="599 members, 99 of them in the model's population of 20,000"):
        expand(t.model, t.snapshot, np.concatenate([small, outsiders]), reach_fraction=0.05)
    seed = segment_seed(t, 2, 200)
    for kwargs, field in (
        ({"reach_fraction": 0.21}, "reach_fraction"),
        ({"reach_fraction": 0.005}, "reach_fraction"),
        ({"reach_size": 0}, "reach_size"),
        ({"reach_size": 4_001}, "reach_size"),  # 20% of 20,000 is the most
        ({}, "reach"),
    ):
        with pytest.raises(ExpandError) as info:
            expand(t.model, t.snapshot, seed, **kwargs)
        assert info.value.field == field
    with pytest.raises(NotEnoughCandidates) as too_tight:
        expand(t.model, t.snapshot, seed, reach_size=500, allowed=np.arange(1, 300, dtype=np.uint32))
    assert too_tight.value.requested == 500 and too_tight.value.eligible <= 299
    assert resolve_reach(20_000, fraction=0.01) == 200 and resolve_reach(20_000, size=2_000) == 2_000


def _clone_model(t: Trained, model_id: str, centers: np.ndarray | None = None, **changes: object) -> None:
    source = f"{ROOT}models/m1/v1/"
    manifest = read_manifest(t.store, source + "manifest.json")
    for key in ("files", "published_at"):
        manifest.pop(key)
    manifest.update(changes, model_id=model_id)
    target = f"{ROOT}models/{model_id}/v1/"
    payload = t.store.get_bytes(source + "centers.npy")
    if centers is not None:
        buffer = io.BytesIO()
        np.save(buffer, centers)
        payload = buffer.getvalue()
    publish(
        t.store,
        data={target + "centers.npy": payload},
        manifest_key=target + "manifest.json",
        manifest=manifest,
    )


def test_model_and_snapshot_resolution(trained: Trained, tmp_path) -> None:
    t = trained
    assert pipeline.snapshot_for(t.store, ROOT, t.model).snapshot_id == t.snapshot.snapshot_id
    with pytest.raises(pipeline.ModelNotFound):
        pipeline.resolve_model(t.store, ROOT, "nope")
    with pytest.raises(pipeline.NoModel):
        pipeline.resolve_model(LocalObjectStore(tmp_path / "empty"), ROOT, None)

    # A model from older feature code, and one whose schema is not its snapshot's: refused, not misused.
    _clone_model(t, "old-code", feature_version=0)
    with pytest.raises(pipeline.SchemaMismatch, match="feature version 0"):
        pipeline.snapshot_for(t.store, ROOT, load_model(t.store, ROOT, "old-code"))
    other = build_snapshot(
        t.store, t.dataset, root=ROOT, as_of=t.snapshot.as_of, top_categories=5, snapshot_id="top5"
    )
    schema = other.schema.to_json()
    _clone_model(t, "bent", schema=schema, feature_schema=other.fingerprint)
    with pytest.raises(pipeline.SchemaMismatch, match="99 centre dimensions for 84 columns"):
        pipeline.snapshot_for(t.store, ROOT, load_model(t.store, ROOT, "bent"))
    fitting = np.zeros((4, len(other.schema.columns)), np.float32)
    _clone_model(t, "foreign", fitting, schema=schema, feature_schema=other.fingerprint)
    with pytest.raises(pipeline.SchemaMismatch, match=f"its snapshot {t.snapshot.snapshot_id!r} has schema"):
        pipeline.snapshot_for(t.store, ROOT, load_model(t.store, ROOT, "foreign"))
    _clone_model(
        t, "orphan", fitting, feature_snapshot="gone", schema=schema, feature_schema=other.fingerprint
    )
    t.store.delete_prefix(f"{ROOT}features/top5/")
    with pytest.raises(pipeline.SnapshotMissing):
        pipeline.snapshot_for(t.store, ROOT, load_model(t.store, ROOT, "orphan"))

    # Fresh features with the model's schema are what it expands over next.
    fresh = pipeline.build_features(
        t.store, t.dataset, root=ROOT, as_of=t.snapshot.as_of + timedelta(hours=1), like_model=t.model
    )
    assert fresh.fingerprint == t.model.feature_schema
    assert pipeline.snapshot_for(t.store, ROOT, t.model).snapshot_id == fresh.snapshot_id
    buf = io.BytesIO(t.store.get_bytes(f"{ROOT}models/m1/v1/centers.npy"))
    assert np.load(buf, allow_pickle=False).shape == (5, 32, len(t.model.schema.columns))  # 5 fits


# --- the ranking: cluster count, consensus, blend, honest lift, tiers --------------------------------


def test_cluster_count_rule() -> None:
    assert default_cluster_count(943) == 31  # MovieLens: ~30 users per cluster, not 15 at a fixed 64
    assert default_cluster_count(815) == 29
    assert default_cluster_count(20_000) == 64 == default_cluster_count(5_000_000)
    assert default_cluster_count(50) == 5  # at most n/10: ten users per cluster on average
    assert default_cluster_count(943, distinct_rows=12) == 12  # never more centres than distinct rows
    assert default_cluster_count(3) == 2 or default_cluster_count(3) <= 3


def test_expansion_reports_blend_auc_lift_intervals_and_tiers(trained: Trained) -> None:
    t = trained
    seed = segment_seed(t, 3, 600, seed=11)
    result = expand(t.model, t.snapshot, seed, reach_fraction=0.05)
    assert result.fits == 5 and set(result.blend) == {"cluster", "classifier", "activity"}
    assert sum(result.blend.values()) == pytest.approx(1.0)
    assert result.heldout_auc > 0.8 and result.blend_rule
    assert set(result.component_auc) == {"cluster", "classifier", "activity"}
    # The lift curve: each step once, the requested one marked, the point inside its interval.
    sizes = [s.size for s in result.lift_curve]
    assert sizes == sorted(set(sizes)) == [200, 400, 1000, 2000]
    assert [s.requested for s in result.lift_curve] == [False, False, True, False]
    for step in result.lift_curve:
        assert not step.withheld and step.low <= step.lift <= step.high and step.lift > 1.5
    odd = expand(t.model, t.snapshot, seed, reach_size=1001)
    assert [s.size for s in odd.lift_curve] == [200, 400, 1000, 1001, 2000]
    # Tiers: rank ranges cut at 1/2/5% of the population; the best tier holds the best scores.
    assert [(x.start_fraction, x.end_fraction, x.size) for x in result.tiers] == [
        (0.0, 0.01, 200),
        (0.01, 0.02, 200),
        (0.02, 0.05, 600),
    ]
    assert result.member_tiers is not None and result.ranked is not None
    assert np.bincount(result.member_tiers).tolist() == [200, 200, 600]
    best = set(result.ranked[:200].tolist())
    assert best == set(result.members[result.member_tiers == 0].tolist())
    assert result.stats()["tiers"][0] == {"start_fraction": 0.0, "end_fraction": 0.01, "size": 200}


def test_lift_is_withheld_for_a_small_seed(trained: Trained) -> None:
    t = trained
    seed = segment_seed(t, 2, 60, seed=5)
    result = expand(t.model, t.snapshot, seed, reach_fraction=0.02, min_seed=10)
    assert len(result.members) == 400
    for step in result.lift_curve:
        assert "held-out half of the seed has" in step.withheld and "at least 50" in step.withheld
        assert np.isnan(step.lift) and "expected_lift" not in step.to_json()


def test_retraining_with_another_seed_keeps_the_expansion(trained: Trained) -> None:
    """The consensus of five soft clusterings: another fit seed selects nearly the same users."""
    t = trained
    seed = segment_seed(t, 6, 400, seed=2)
    members = []
    for fit_seed in (1, 2):
        model = train_model(t.store, t.snapshot, model_id=f"stable-{fit_seed}", seed=fit_seed)
        assert model.cluster_count == 64 and model.fits == 5 and len(model.median_d2 or []) == 5
        members.append(set(expand(model, t.snapshot, seed, reach_fraction=0.05).members.tolist()))
    overlap = len(members[0] & members[1]) / len(members[0])
    assert overlap > 0.9, overlap


def test_a_one_fit_model_from_before_the_ensemble_still_expands(trained: Trained) -> None:
    t = trained
    centers = load_model(t.store, ROOT, "m1", version=1).centers  # k x d, as the old format stored
    _clone_model(t, "one-fit", centers)
    manifest_key = f"{ROOT}models/one-fit/v1/manifest.json"
    assert "median_d2" in read_manifest(t.store, manifest_key)
    old = load_model(t.store, ROOT, "one-fit")
    old.manifest.pop("median_d2")  # and no soft-membership scale: derived from the data
    assert old.fits == 1 and old.median_d2 is None
    result = expand(old, t.snapshot, segment_seed(t, 3, 300), reach_fraction=0.02)
    assert len(result.members) == 400 and result.heldout_auc > 0.7


def test_ranking_follows_activity_when_the_seed_is_the_active_users() -> None:
    """One cell, seed = the most active users: the held-out halves must pick a blend that ranks the
    most active candidates first (the cluster term alone cannot see it)."""
    rng = np.random.default_rng(5)
    n, d = 6_000, 4
    x = rng.normal(size=(n, d)).astype(np.float32)
    activity = np.floor(np.exp(1.5 + x[:, 0]))
    p_seed = 1 / (1 + np.exp(-(2.5 * x[:, 0] - 3)))
    seed_mask = rng.random(n) < p_seed
    ids = np.arange(1, n + 1, dtype=np.uint32)
    centers = np.zeros((1, 1, d), np.float32)
    ranking = rank_in_memory(centers, ids, x, activity, ids[seed_mask])
    assert ranking.weights["cluster"] < 1 and ranking.heldout_auc > 0.8
    rest = ~seed_mask
    top = np.argsort(-ranking.scores["all"][rest], kind="stable")[:100]
    assert x[rest, 0][top].mean() > np.quantile(x[rest, 0], 0.9)
    again = rank_in_memory(centers, ids, x, activity, ids[seed_mask])
    assert np.array_equal(again.scores["all"], ranking.scores["all"])  # deterministic
    fixed = rank_in_memory(
        centers, ids, x, activity, ids[seed_mask], RankingParams(fixed_blend=(1.0, 0.0, 0.0))
    )
    assert fixed.weights == {"cluster": 1.0, "classifier": 0.0, "activity": 0.0}
    assert fixed.blend.rule == "fixed by the caller"


def test_blend_choice_prefers_a_clear_winner_and_the_default_within_noise() -> None:
    rng = np.random.default_rng(8)
    n = 4_000
    y = rng.random(n) < 0.2
    strong = y * 1.5 + rng.normal(size=n)
    noise = [rng.normal(size=n) for _ in range(3)]
    grid = simplex_grid(3, 4)
    default = (0.25, 0.25, 0.5)
    clear = choose_blend([(y, [noise[0], strong, noise[1]])] * 2, grid, default)
    assert clear.weights == (0.0, 1.0, 0.0) and clear.rule == "best held-out AUC"
    assert clear.heldout_auc == clear.table[(0.0, 1.0, 0.0)] > 0.8
    halves = []
    for _half in range(2):  # two independent held-out halves of pure noise
        halves.append((rng.random(n) < 0.2, [rng.normal(size=n) for _ in range(3)]))
    unclear = choose_blend(halves, grid, default)
    assert unclear.weights == default and "default" in unclear.rule
    nothing = choose_blend([(np.zeros(n, bool), noise)], grid, default)
    assert nothing.weights == default and np.isnan(nothing.heldout_auc)


def test_delong_auc_matches_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.random(2_000) < 0.2
    s = rng.integers(0, 7, 2_000).astype(np.float64) + y  # many ties
    auc, v10, v01 = delong_placements(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert v10.mean() == pytest.approx(v01.mean()) and len(v10) == y.sum()


def test_reach_steps_and_wilson() -> None:
    assert reach_steps(943, (0.01, 0.02, 0.05, 0.10), 47) == [
        (0.01, 9, False),
        (0.02, 19, False),
        (0.049841, 47, True),  # 5% of 943 rounds to 47: one step, the requested one
        (0.1, 94, False),
    ]
    lo, hi = wilson(30, 100)
    assert lo < 0.3 < hi and wilson(0, 10)[0] == 0.0
