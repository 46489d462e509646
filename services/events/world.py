"""The simulated world: catalog, campaigns, videos, latent segments and the flash-sale story constants.

``build_world(...)`` returns the JSON-able dict written to ``{prefix}world.json``; the generator,
the demo and pack specs refer to ids through it. Fixed ids (hook item, campaigns, teaser videos) are
module constants so that they do not depend on the seed; prices of ordinary items do.

The story: a merchant's flash sale "29.9 for a 199 T-shirt, 500 pieces", T-0 = 10:00 Beijing time
(02:00 UTC) on the sale day, preheated by teaser videos in the days before, sold in a one-hour live
room. A higher-margin jacket in the same category is the natural retarget offer afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import numpy as np

from services.events.schema import (
    AGE_BAND_NAMES,
    EVENT_TYPE_NAMES,
    GENDER_NAMES,
    ID_TYPE_NAMES,
    INTEREST_TAGS,
    REGIONS,
)

WORLD_FORMAT = "flashcrowd.world/v1"
DEFAULT_START_DATE = date(2025, 6, 12)  # with --days 8 the sale day is 2025-06-18 ("618")
CURRENCY = "CNY"

# Fixed ids of the story.
MERCHANT_SHOP_ID = 6001
HOOK_ITEM_ID = 100001
RETARGET_ITEM_ID = 100002
PREHEAT_CAMPAIGN_ID = 900001
LIVE_CAMPAIGN_ID = 900002
LIVE_COUPON_CAMPAIGN_ID = 900003
TEASER_VIDEO_IDS = (790001, 790002)
TEASER_DURATIONS_S = (30, 45)
HOOK_LIST_PRICE_FEN = 19900
HOOK_SALE_PRICE_FEN = 2990
HOOK_STOCK = 500
RETARGET_PRICE_FEN = 39900
SALE_START_HOUR_UTC = 2  # 10:00 Beijing time
SALE_DURATION = timedelta(hours=1)
LIVE_COUPON_THRESHOLD_FEN = 19900
LIVE_COUPON_DISCOUNT_FEN = 2000

N_ITEMS = 2000
N_VIDEOS = 600
ITEM_ID_BASE = 100001
VIDEO_ID_BASE = 700001
AD_CAMPAIGN_BASE = 800001  # two per category
LIVE_ROOM_BASE = 810001  # other merchants' live rooms, one per category
COUPON_CAMPAIGN_BASE = 820001  # platform coupons
N_COUPON_CAMPAIGNS = 10

# (category_id, name, interest tag, median price fen, share of the catalog)
CATEGORIES: tuple[tuple[int, str, str, int, float], ...] = (
    (1, "apparel", "apparel", 15900, 0.10),
    (2, "shoes", "apparel", 29900, 0.06),
    (3, "bags_accessories", "apparel", 19900, 0.05),
    (4, "skincare", "beauty", 15900, 0.06),
    (5, "makeup", "beauty", 9900, 0.06),
    (6, "phones", "electronics", 249900, 0.03),
    (7, "computers", "electronics", 499900, 0.03),
    (8, "audio_wearables", "electronics", 39900, 0.04),
    (9, "snacks", "food", 3990, 0.07),
    (10, "fresh_food", "food", 6990, 0.05),
    (11, "home_textiles", "home", 12900, 0.05),
    (12, "kitchen", "home", 8990, 0.05),
    (13, "small_appliances", "home", 29900, 0.04),
    (14, "sports_outdoor", "sports", 19900, 0.05),
    (15, "baby_care", "mother_baby", 12900, 0.05),
    (16, "toys", "mother_baby", 9900, 0.04),
    (17, "books", "books", 4990, 0.05),
    (18, "travel_deals", "travel", 59900, 0.03),
    (19, "value_packs", "deals", 1990, 0.06),
    (20, "pet_supplies", "home", 6990, 0.03),
)
N_CATEGORIES = len(CATEGORIES)
HOOK_CATEGORY_ID = 1

# Rough provincial populations (millions): the base of every region distribution.
# fmt: off
_REGION_POP = {
    "CN-GD": 126, "CN-SD": 102, "CN-HA": 99, "CN-JS": 85, "CN-SC": 84, "CN-HE": 75, "CN-ZJ": 65,
    "CN-HN": 66, "CN-AH": 61, "CN-HB": 58, "CN-GX": 50, "CN-YN": 47, "CN-JX": 45, "CN-LN": 42,
    "CN-FJ": 41, "CN-SN": 40, "CN-GZ": 39, "CN-SX": 35, "CN-CQ": 32, "CN-HL": 31, "CN-XJ": 26,
    "CN-GS": 25, "CN-NM": 24, "CN-SH": 25, "CN-JL": 24, "CN-BJ": 22, "CN-TJ": 14, "CN-HI": 10,
    "CN-NX": 7, "CN-QH": 6, "CN-XZ": 4,
}
# fmt: on
_TIER1 = ("CN-BJ", "CN-SH", "CN-GD", "CN-ZJ", "CN-JS", "CN-TJ", "CN-FJ")
# fmt: off
_LOWER_TIER = (
    "CN-HA", "CN-HE", "CN-SD", "CN-SC", "CN-AH", "CN-HN", "CN-HB", "CN-GX", "CN-JX", "CN-YN", "CN-GZ",
    "CN-SX", "CN-GS", "CN-HL", "CN-JL",
)
# fmt: on


@dataclass(frozen=True)
class Segment:
    """One latent segment: behaviour rates and profile distributions. Rates are per active day."""

    code: int
    name: str
    share: float
    inactive: float  # share with no events at all in the data set
    p_day: float  # chance of being active on a given day
    views: float  # product views per active day
    p_click: float  # view -> click
    p_cart: float  # click -> add_cart (at the category's median price)
    p_order: float  # add_cart -> order (at the median price)
    price_sensitivity: float  # how strongly price above the category median lowers cart/order odds
    videos: float  # video plays per active day
    p_finish: float
    lives: float  # live-room entries (other merchants) per active day
    follows: float  # follows per active day
    coupon_user: float  # share of users who claim/redeem platform coupons
    coupons: float  # coupon claims per active day (coupon users)
    p_redeem: float  # order of a coupon user -> coupon redeemed
    teaser: float  # watches the preheat teaser
    join_base: float  # joins the sale live room without having seen the teaser
    follow_shop: float  # teaser watcher follows the merchant
    p_attempt: float  # hook clicker tries to buy
    p_live_coupon: float  # live-room joiner claims the live coupon
    categories: dict[int, float]  # affinity weights (others 0.3)
    ages: tuple[float, ...]  # weights of age bands 1..7
    female: float
    region_tilt: tuple[tuple[tuple[str, ...], float], ...]
    interests: tuple[float, ...]  # probability of each INTEREST_TAGS tag


# Positional fields in declaration order (code, name, share, inactive, p_day, views, p_click, p_cart,
# p_order, price_sensitivity, videos, p_finish, lives, follows, coupon_user, coupons, p_redeem, teaser,
# join_base, follow_shop, p_attempt, p_live_coupon), then categories, ages, female, region_tilt, interests.
# fmt: off
SEGMENTS: tuple[Segment, ...] = (
    Segment(
        1, "bargain_hunters", 0.20, 0.10, 0.42, 2.6, 0.38, 0.20, 0.35, 1.6, 0.9, 0.40, 0.12, 0.01,
        0.60, 0.30, 0.50, 0.10, 0.030, 0.25, 0.80, 0.45,
        {19: 6, 9: 4, 11: 3, 12: 3, 1: 3, 10: 3, 5: 1.5, 20: 1.5},
        (0.01, 0.06, 0.12, 0.18, 0.22, 0.25, 0.16), 0.68, ((_LOWER_TIER, 1.8),),
        (0.35, 0.85, 0.20, 0.10, 0.55, 0.45, 0.08, 0.15, 0.05, 0.08),
    ),
    Segment(
        2, "fashion_fans", 0.16, 0.10, 0.42, 2.8, 0.45, 0.18, 0.30, 0.6, 1.8, 0.55, 0.22, 0.03,
        0.20, 0.10, 0.15, 0.18, 0.030, 0.30, 0.65, 0.20,
        {1: 8, 2: 5, 3: 4, 5: 4, 4: 4},
        (0.04, 0.34, 0.34, 0.16, 0.07, 0.04, 0.01), 0.85, ((_TIER1, 2.5),),
        (0.90, 0.30, 0.75, 0.10, 0.20, 0.15, 0.15, 0.05, 0.10, 0.30),
    ),
    Segment(
        3, "tech_buyers", 0.12, 0.12, 0.32, 2.0, 0.40, 0.10, 0.30, 0.2, 1.1, 0.45, 0.05, 0.01,
        0.10, 0.05, 0.10, 0.02, 0.005, 0.10, 0.30, 0.10,
        {6: 5, 7: 4, 8: 5, 14: 3, 17: 2, 13: 2},
        (0.03, 0.20, 0.32, 0.25, 0.12, 0.06, 0.02), 0.18, ((("CN-BJ", "CN-SH", "CN-GD"), 4.0), (_TIER1, 1.8)),
        (0.15, 0.15, 0.05, 0.90, 0.15, 0.20, 0.45, 0.03, 0.35, 0.25),
    ),
    Segment(
        4, "young_parents", 0.14, 0.10, 0.42, 2.4, 0.40, 0.22, 0.40, 0.8, 0.7, 0.35, 0.08, 0.01,
        0.30, 0.10, 0.30, 0.05, 0.010, 0.20, 0.40, 0.25,
        {15: 8, 16: 6, 10: 3, 9: 2, 12: 2, 1: 1.5},
        (0.0, 0.05, 0.38, 0.40, 0.13, 0.03, 0.01), 0.78, ((_TIER1, 1.3),),
        (0.30, 0.35, 0.25, 0.10, 0.40, 0.45, 0.10, 0.90, 0.15, 0.10),
    ),
    Segment(
        5, "casual_browsers", 0.28, 0.35, 0.20, 1.4, 0.25, 0.06, 0.20, 0.9, 0.9, 0.30, 0.04, 0.005,
        0.10, 0.05, 0.10, 0.03, 0.005, 0.10, 0.30, 0.10,
        {9: 2, 17: 1.5, 18: 1.5},
        (0.08, 0.22, 0.20, 0.16, 0.13, 0.12, 0.09), 0.50, (),
        (0.20, 0.20, 0.15, 0.20, 0.25, 0.20, 0.15, 0.10, 0.20, 0.20),
    ),
    Segment(
        6, "live_loyalists", 0.10, 0.08, 0.55, 1.8, 0.40, 0.15, 0.35, 0.8, 1.5, 0.65, 1.0, 0.05,
        0.35, 0.10, 0.30, 0.40, 0.100, 0.50, 0.70, 0.35,
        {1: 4, 4: 4, 5: 3, 9: 3, 10: 3, 12: 2, 11: 2, 19: 2},
        (0.0, 0.04, 0.10, 0.16, 0.22, 0.30, 0.18), 0.75, ((_LOWER_TIER, 2.2),),
        (0.55, 0.50, 0.50, 0.05, 0.50, 0.40, 0.05, 0.15, 0.05, 0.10),
    ),
)
# fmt: on
SEGMENT_CODES = tuple(s.code for s in SEGMENTS)
N_SEGMENTS = len(SEGMENTS)
_BEIJING = timezone(timedelta(hours=8), "CST")


def _segment_array(attr: str) -> np.ndarray:
    """Per-segment parameter indexed by segment code (index 0 unused)."""
    out = np.zeros(N_SEGMENTS + 1, dtype=np.float64)
    for s in SEGMENTS:
        out[s.code] = getattr(s, attr)
    return out


def segment_table() -> dict[str, np.ndarray]:
    """Numeric segment parameters as arrays indexed by segment code, plus cumulative distributions."""
    scalar = [
        "share", "inactive", "p_day", "views", "p_click", "p_cart", "p_order", "price_sensitivity",
        "videos", "p_finish", "lives", "follows", "coupon_user", "coupons", "p_redeem", "teaser",
        "join_base", "follow_shop", "p_attempt", "p_live_coupon", "female",
    ]  # fmt: skip
    table = {name: _segment_array(name) for name in scalar}
    cat = np.full((N_SEGMENTS + 1, N_CATEGORIES), 0.3)
    ages = np.zeros((N_SEGMENTS + 1, 7))
    regions = np.zeros((N_SEGMENTS + 1, len(REGIONS)))
    interests = np.zeros((N_SEGMENTS + 1, len(INTEREST_TAGS)))
    base = np.array([_REGION_POP[r] for r in REGIONS], dtype=np.float64)
    for s in SEGMENTS:
        for cid, w in s.categories.items():
            cat[s.code, cid - 1] = w
        ages[s.code] = s.ages
        tilt = base.copy()
        for group, factor in s.region_tilt:
            for i, r in enumerate(REGIONS):
                if r in group:
                    tilt[i] *= factor
        regions[s.code] = tilt
        interests[s.code] = s.interests
    cat[0] = 1.0
    ages[0] = 1.0
    regions[0] = base
    interests[0] = 0.2

    def cdf(m: np.ndarray) -> np.ndarray:
        c = np.cumsum(m / m.sum(axis=1, keepdims=True), axis=1)
        c[:, -1] = 1.0
        return c

    table["category_cdf"] = cdf(cat)
    table["age_cdf"] = cdf(ages)
    table["region_cdf"] = cdf(regions)
    table["interest_p"] = interests
    shares = np.array([s.share for s in SEGMENTS])
    table["share_cdf"] = np.cumsum(shares / shares.sum())
    return table


# Beijing-time hourly activity weights (00..23 CST); events are drawn in UTC from the shifted curve.
# fmt: off
_CST_HOUR_WEIGHTS = (
    2.0, 1.0, 0.6, 0.4, 0.4, 0.6, 1.2, 2.5, 3.5, 4.0, 4.5, 4.5,
    5.0, 4.5, 4.0, 3.8, 3.8, 4.0, 4.5, 5.5, 6.5, 7.0, 6.0, 4.0,
)
# fmt: on


def utc_hour_cdf() -> np.ndarray:
    w = np.array([_CST_HOUR_WEIGHTS[(h + 8) % 24] for h in range(24)])
    c = np.cumsum(w / w.sum())
    c[-1] = 1.0
    return c


def _shop_price(fen: np.ndarray) -> np.ndarray:
    """Round to shop-style prices: 199.00, 39.00, 9.90 ... (integer fen)."""
    yuan = np.maximum(1, np.rint(fen / 100.0)).astype(np.int64)
    big = yuan >= 20
    out = np.where(big, ((yuan // 10) * 10 + 9) * 100, yuan * 100 - 10)
    return out.astype(np.int64)


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def sale_start(start_date: date, sale_day: int) -> datetime:
    """T-0 of the flash sale in UTC."""
    d = start_date + timedelta(days=sale_day)
    return datetime(d.year, d.month, d.day, SALE_START_HOUR_UTC, tzinfo=UTC)


def build_world(*, seed: int, users: int, days: int, start_date: date, sale_day: int) -> dict[str, Any]:
    """The catalog and story constants (deterministic in ``seed``); see the module doc."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(1_000_000,)))
    # Items: contiguous id ranges per category; the hook and the jacket are the first two apparel items.
    shares = np.array([c[4] for c in CATEGORIES])
    counts = np.floor(shares / shares.sum() * N_ITEMS).astype(int)
    counts[0] += N_ITEMS - counts.sum()
    items: list[dict[str, Any]] = []
    next_id = ITEM_ID_BASE
    for (cid, _name, _tag, median, _share), n in zip(CATEGORIES, counts, strict=True):
        prices = _shop_price(median * rng.lognormal(0.0, 0.5, n))
        for price in prices:
            items.append({"item_id": next_id, "category_id": cid, "price_fen": int(price)})
            next_id += 1
    items[0].update(price_fen=HOOK_LIST_PRICE_FEN, name="classic cotton T-shirt")
    items[1].update(price_fen=RETARGET_PRICE_FEN, name="light windbreaker jacket")
    assert items[0]["item_id"] == HOOK_ITEM_ID and items[1]["item_id"] == RETARGET_ITEM_ID

    cat_ids = np.array([c[0] for c in CATEGORIES])
    vcounts = np.floor(shares / shares.sum() * N_VIDEOS).astype(int)
    vcounts[0] += N_VIDEOS - vcounts.sum()
    video_cats = np.repeat(cat_ids, vcounts)  # every category has videos
    durations = rng.integers(10, 121, size=N_VIDEOS)
    videos = [
        {"video_id": VIDEO_ID_BASE + i, "category_id": int(c), "duration_s": int(d)}
        for i, (c, d) in enumerate(zip(video_cats, durations, strict=True))
    ]
    for vid, dur in zip(TEASER_VIDEO_IDS, TEASER_DURATIONS_S, strict=True):
        videos.append({"video_id": vid, "category_id": HOOK_CATEGORY_ID, "duration_s": dur, "teaser": True})

    campaigns: list[dict[str, Any]] = []
    for i, (cid, name, *_rest) in enumerate(CATEGORIES):
        for k in range(2):
            campaigns.append(
                {
                    "campaign_id": AD_CAMPAIGN_BASE + 2 * i + k,
                    "kind": "ad",
                    "category_id": cid,
                    "name": f"{name} ads {k + 1}",
                }
            )
    for i, (cid, name, *_rest) in enumerate(CATEGORIES):
        campaigns.append(
            {
                "campaign_id": LIVE_ROOM_BASE + i,
                "kind": "live_room",
                "category_id": cid,
                "name": f"{name} live",
            }
        )
    for k in range(N_COUPON_CAMPAIGNS):
        campaigns.append(
            {
                "campaign_id": COUPON_CAMPAIGN_BASE + k,
                "kind": "coupon",
                "category_id": int(cat_ids[k * 2]),
                "name": f"platform coupon {k + 1}",
            }
        )
    campaigns += [
        {
            "campaign_id": PREHEAT_CAMPAIGN_ID,
            "kind": "preheat",
            "category_id": HOOK_CATEGORY_ID,
            "name": "flash sale preheat (teasers)",
        },
        {
            "campaign_id": LIVE_CAMPAIGN_ID,
            "kind": "sale_live",
            "category_id": HOOK_CATEGORY_ID,
            "name": "flash sale live room",
        },
        {
            "campaign_id": LIVE_COUPON_CAMPAIGN_ID,
            "kind": "sale_coupon",
            "category_id": HOOK_CATEGORY_ID,
            "name": "live-room coupon 20 off 199",
        },
    ]

    # Live-room assortment: hook, jacket and six more apparel/beauty items.
    pool = [it["item_id"] for it in items[2:] if it["category_id"] in (1, 2, 3, 4, 5)]
    extra = sorted(int(x) for x in rng.choice(pool, size=6, replace=False))
    live_items = [HOOK_ITEM_ID, RETARGET_ITEM_ID, *extra]

    start = datetime(start_date.year, start_date.month, start_date.day, tzinfo=UTC)
    end = start + timedelta(days=days)
    t0 = sale_start(start_date, sale_day)
    preheat_start = max(start, t0 - timedelta(days=3))
    return {
        "format": WORLD_FORMAT,
        "seed": seed,
        "population": users,
        "currency": CURRENCY,
        "time_zone": "UTC (Beijing = UTC+8)",
        "start": _iso(start),
        "end": _iso(end),
        "dates": [(start_date + timedelta(days=i)).isoformat() for i in range(days)],
        "event_types": {name: code for code, name in EVENT_TYPE_NAMES.items()},
        "age_bands": {str(k): v for k, v in AGE_BAND_NAMES.items()},
        "genders": {str(k): v for k, v in GENDER_NAMES.items()},
        "id_types": {str(k): v for k, v in ID_TYPE_NAMES.items()},
        "interest_tags": list(INTEREST_TAGS),
        "regions": list(REGIONS),
        "segments": [{"code": s.code, "name": s.name, "share": s.share} for s in SEGMENTS],
        "categories": [
            {"category_id": c[0], "name": c[1], "tag": c[2], "median_price_fen": c[3]} for c in CATEGORIES
        ],
        "items": items,
        "videos": videos,
        "campaigns": campaigns,
        "merchant": {"shop_id": MERCHANT_SHOP_ID, "name": "flashcrowd demo apparel"},
        "sale": {
            "name": "29.9 for a 199 T-shirt, 500 pieces",
            "day": t0.date().isoformat(),
            "day_index": sale_day,
            "start": _iso(t0),
            "end": _iso(t0 + SALE_DURATION),
            "start_beijing": t0.astimezone(_BEIJING).isoformat(),
            "preheat_start": _iso(preheat_start),
            "hook_item_id": HOOK_ITEM_ID,
            "hook_category_id": HOOK_CATEGORY_ID,
            "hook_list_price_fen": HOOK_LIST_PRICE_FEN,
            "hook_sale_price_fen": HOOK_SALE_PRICE_FEN,
            "hook_stock": HOOK_STOCK,
            "retarget_item_id": RETARGET_ITEM_ID,
            "retarget_price_fen": RETARGET_PRICE_FEN,
            "preheat_campaign_id": PREHEAT_CAMPAIGN_ID,
            "teaser_video_ids": list(TEASER_VIDEO_IDS),
            "live_campaign_id": LIVE_CAMPAIGN_ID,
            "live_item_ids": live_items,
            "live_coupon": {
                "campaign_id": LIVE_COUPON_CAMPAIGN_ID,
                "threshold_fen": LIVE_COUPON_THRESHOLD_FEN,
                "discount_fen": LIVE_COUPON_DISCOUNT_FEN,
            },
        },
        "conventions": {
            "amount_fen": "order/pay/refund: amount payable after coupon (refund = paid amount, same "
            "order_id); coupon_redeem: the discount, with the order_id it was used on",
            "follow": "campaign_id = preheat or sale_live campaign for follows of the merchant's shop",
            "nulls": "ids that do not apply are null",
        },
    }
