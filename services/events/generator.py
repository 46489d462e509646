"""Deterministic flash-sale event generator (``flashcrowd gen``).

Same arguments and the same identity pepper -> byte-identical Parquet files (and the same manifest
apart from ``published_at``). The identity map holds keyed hashes only (``services.events.identity``),
under the pepper passed to ``generate`` or else ``services.events.pepper.load_pepper()``.

How it works
------------
* Users are ``1..N``. Every random draw comes from a per-*bucket* stream:
  ``PCG64(SeedSequence(seed, spawn_key=(bucket, stream)))`` with one stream per concern (latent
  traits, sale race, sale events, background, bots). The data therefore do not depend on
  ``chunk_users`` (which only sets memory use and file count), and streams of different seeds never
  overlap (``PCG64(seed + chunk)`` would reuse seed 1's chunk 1 as seed 2's chunk 0).
* A *chunk* is a contiguous bucket range (``Shard(k, n_chunks)``), so each written file covers a
  narrow bucket range: the manifest's per-file ``min/max_bucket`` lets a shard worker skip whole
  files, and row-group statistics prune inside them.
* Pass 1 (cheap) runs only the "race" stream of every bucket: who tries to buy the hook item at what
  microsecond. The first ``HOOK_STOCK`` attempts (by time, then user id) win; nobody else can buy it.
  Pass 2 generates every event per chunk, vectorised with numpy per bucket, sorts by
  ``(bucket, user_id, ts)``, and writes one zstd Parquet part per (day, chunk) to a temp dir. Then
  ``publish`` uploads all parts and world.json, and writes ``manifest.json`` last.
* ``event_id = user_id << 24 | n`` where ``n`` is the event's rank in the user's history (so
  generator ids are < 2**56; other producers should set the top byte). ``order_id`` is built the
  same way from the user's order rank.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from services.events import world as W
from services.events.identity import key_normalised
from services.events.parts import (
    DEFAULT_ROW_GROUP_SIZE,
    DatasetExistsError,
    clear_dataset,
    default_table_format,
    open_sink,
)
from services.events.pepper import Pepper, load_pepper
from services.events.schema import INTEREST_TAGS, OWNER, PLATFORM_OWNER, EventType, IdType
from services.events.sharding import NUM_BUCKETS, Shard, buckets_np
from services.storage.base import ObjectStore

__all__ = [
    "GENERATOR_VERSION",
    "DatasetExistsError",
    "GenConfig",
    "GenResult",
    "generate",
    "synthetic_identities",
]

GENERATOR_VERSION = 1
SEC = 1_000_000
DAY_US = 86_400 * SEC
HOUR_US = 3_600 * SEC

_LATENT, _RACE, _SALE, _BACKGROUND, _BOTS = 1, 2, 3, 4, 5

# Global volume calibration: ~20 events per user over 8 days at the default bot share.
_VOLUME = 0.93

_E = EventType


@dataclass(frozen=True)
class GenConfig:
    users: int
    days: int
    seed: int = 0
    start_date: date = W.DEFAULT_START_DATE
    sale_day: int | None = None  # day index (0-based; negative counts from the end); default days-2
    chunk_users: int = 100_000
    prefix: str = "data/"
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE
    bot_share: float = 0.005

    def __post_init__(self) -> None:
        if not 1 <= self.users <= 0xFFFFFFFF - 1:
            raise ValueError(f"users must be in 1..{0xFFFFFFFF - 1}, got {self.users}")
        if not 1 <= self.days <= 366:
            raise ValueError(f"days must be in 1..366, got {self.days}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.chunk_users < 1:
            raise ValueError(f"chunk_users must be >= 1, got {self.chunk_users}")
        if not 0.0 <= self.bot_share < 0.5:
            raise ValueError(f"bot_share must be in [0, 0.5), got {self.bot_share}")
        if self.row_group_size < 1024:
            raise ValueError(f"row_group_size must be >= 1024, got {self.row_group_size}")
        k = self.sale_day_index
        if not 0 <= k < self.days:
            raise ValueError(
                f"sale day {self.sale_day} is outside the {self.days} generated days "
                f"(use 0..{self.days - 1}, or -1 for the last day)"
            )
        if self.prefix and not self.prefix.endswith("/"):
            object.__setattr__(self, "prefix", self.prefix + "/")
        if self.prefix.startswith("/"):
            raise ValueError(f"prefix must not start with '/': {self.prefix!r}")

    @property
    def sale_day_index(self) -> int:
        if self.sale_day is None:
            return max(0, self.days - 2)
        return self.sale_day + self.days if self.sale_day < 0 else self.sale_day

    @property
    def n_chunks(self) -> int:
        return max(1, min(NUM_BUCKETS, math.ceil(self.users / self.chunk_users)))

    def as_dict(self) -> dict[str, Any]:
        return {
            "users": self.users,
            "days": self.days,
            "seed": self.seed,
            "start_date": self.start_date.isoformat(),
            "sale_day": self.sale_day_index,
            "chunk_users": self.chunk_users,
            "row_group_size": self.row_group_size,
            "bot_share": self.bot_share,
            "generator_version": GENERATOR_VERSION,
        }


@dataclass
class GenResult:
    manifest: dict[str, Any]
    events: int
    users: int
    files: int
    bytes: int
    seconds: float
    peak_rss_bytes: int
    story: dict[str, Any] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _rng(seed: int, bucket: int, stream: int) -> np.random.Generator:
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(entropy=seed, spawn_key=(bucket, stream)))
    )


# ---------------------------------------------------------------------------------------------------
# Static context: catalog arrays and time constants.


@dataclass
class _Ctx:
    cfg: GenConfig
    world: dict[str, Any]
    tbl: dict[str, np.ndarray]
    start_us: int
    end_us: int
    t0_us: int
    preheat_us: int
    hour_cdf: np.ndarray
    item_price: np.ndarray  # by item index (item_id - ITEM_ID_BASE)
    item_cat: np.ndarray  # 0-based category index by item index
    cat_median: np.ndarray
    cat_items: np.ndarray  # background-eligible item ids grouped by category, popular first
    cat_off: np.ndarray
    cat_n: np.ndarray
    cat_videos: np.ndarray
    vid_off: np.ndarray
    vid_n: np.ndarray
    video_duration: np.ndarray  # by video index (video_id - VIDEO_ID_BASE)
    live_items: np.ndarray  # live-room items except the hook
    live_weights: np.ndarray
    winners: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))


def _us(dt: datetime) -> int:
    return int(dt.timestamp()) * SEC + dt.microsecond


def _make_ctx(cfg: GenConfig) -> _Ctx:
    world = W.build_world(
        seed=cfg.seed, users=cfg.users, days=cfg.days, start_date=cfg.start_date, sale_day=cfg.sale_day_index
    )
    rng = np.random.default_rng(np.random.SeedSequence(entropy=cfg.seed, spawn_key=(1_000_001,)))
    items = world["items"]
    price = np.array([it["price_fen"] for it in items], dtype=np.int64)
    icat = np.array([it["category_id"] - 1 for it in items], dtype=np.int64)
    ids = np.array([it["item_id"] for it in items], dtype=np.int64)
    groups, offs, ns = [], [], []
    off = 0
    for c in range(W.N_CATEGORIES):
        members = ids[(icat == c) & (ids != W.HOOK_ITEM_ID)]
        members = members[rng.permutation(len(members))]  # popularity rank
        groups.append(members)
        offs.append(off)
        ns.append(len(members))
        off += len(members)
    videos = [v for v in world["videos"] if not v.get("teaser")]
    vcat = np.array([v["category_id"] - 1 for v in videos])
    vids = np.array([v["video_id"] for v in videos], dtype=np.int64)
    vgroups, voffs, vns = [], [], []
    off = 0
    for c in range(W.N_CATEGORIES):
        members = vids[vcat == c]
        members = members[rng.permutation(len(members))]
        vgroups.append(members)
        voffs.append(off)
        vns.append(len(members))
        off += len(members)
    live = np.array([i for i in world["sale"]["live_item_ids"] if i != W.HOOK_ITEM_ID], dtype=np.int64)
    lw = np.where(live == W.RETARGET_ITEM_ID, 3.0, 1.0)
    start = datetime.fromisoformat(world["start"])
    end = datetime.fromisoformat(world["end"])
    return _Ctx(
        cfg=cfg,
        world=world,
        tbl=W.segment_table(),
        start_us=_us(start),
        end_us=_us(end),
        t0_us=_us(datetime.fromisoformat(world["sale"]["start"])),
        preheat_us=_us(datetime.fromisoformat(world["sale"]["preheat_start"])),
        hour_cdf=W.utc_hour_cdf(),
        item_price=price,
        item_cat=icat,
        cat_median=np.array([c[3] for c in W.CATEGORIES], dtype=np.float64),
        cat_items=np.concatenate(groups),
        cat_off=np.array(offs),
        cat_n=np.array(ns),
        cat_videos=np.concatenate(vgroups),
        vid_off=np.array(voffs),
        vid_n=np.array(vns),
        video_duration=np.array([v["duration_s"] for v in videos], dtype=np.int64),
        live_items=live,
        live_weights=np.cumsum(lw / lw.sum()),
    )


def _rows(cdf: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per-row categorical draw: index ``i`` with ``cdf[row, i-1] <= u < cdf[row, i]``."""
    if len(u) == 0:
        return np.zeros(0, dtype=np.int64)
    return (u[:, None] >= cdf[rows]).sum(axis=1).astype(np.int64)


def _pick_item(ctx: _Ctx, cat: np.ndarray, u: np.ndarray) -> np.ndarray:
    return ctx.cat_items[ctx.cat_off[cat] + (ctx.cat_n[cat] * u**1.6).astype(np.int64)]


def _pick_video(ctx: _Ctx, cat: np.ndarray, u: np.ndarray) -> np.ndarray:
    return ctx.cat_videos[ctx.vid_off[cat] + (ctx.vid_n[cat] * u**1.6).astype(np.int64)]


def _diurnal(ctx: _Ctx, r: np.random.Generator, day0: np.ndarray) -> np.ndarray:
    n = len(day0)
    hour = np.searchsorted(ctx.hour_cdf, r.random(n), side="right")
    return day0 + hour * HOUR_US + (r.random(n) * HOUR_US).astype(np.int64)


def _secs(x: np.ndarray) -> np.ndarray:
    return np.rint(x * SEC).astype(np.int64)


def _group_ordinal(keys: np.ndarray) -> np.ndarray:
    """Rank of each element among equal keys, in array order (keys need not be sorted)."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    counts = np.diff(np.r_[starts, n])
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(n) - np.repeat(starts, counts)
    return ranks


# ---------------------------------------------------------------------------------------------------
# Per-bucket simulation.


@dataclass
class _Latent:
    seg: np.ndarray
    is_bot: np.ndarray
    inactive: np.ndarray
    act: np.ndarray
    fav: np.ndarray  # favourite category index
    coupon_user: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    region: np.ndarray
    interests: np.ndarray  # (U, n_tags) bool
    signup_days_before: np.ndarray


def _latent(ctx: _Ctx, bucket: int, n: int) -> _Latent:
    r = _rng(ctx.cfg.seed, bucket, _LATENT)
    tbl = ctx.tbl
    seg = np.searchsorted(tbl["share_cdf"], r.random(n), side="right").astype(np.int64) + 1
    seg = np.minimum(seg, W.N_SEGMENTS)
    is_bot = r.random(n) < ctx.cfg.bot_share
    inactive = (r.random(n) < tbl["inactive"][seg]) & ~is_bot
    act = r.lognormal(-0.18, 0.6, n)
    fav = _rows(tbl["category_cdf"], seg, r.random(n))
    coupon_user = r.random(n) < tbl["coupon_user"][seg]
    prof = np.where(is_bot, 0, seg)  # bots get population-wide (segment-free) profiles
    age = _rows(tbl["age_cdf"], prof, r.random(n)) + 1
    female = r.random(n) < np.where(is_bot, 0.5, tbl["female"][seg])
    gender = np.where(female, 1, 2)
    region = _rows(tbl["region_cdf"], prof, r.random(n))
    interests = r.random((n, tbl["interest_p"].shape[1])) < tbl["interest_p"][prof]
    # Incomplete profiles: bots far more often.
    age = np.where(r.random(n) < np.where(is_bot, 0.5, 0.04), 0, age)
    gender = np.where(r.random(n) < np.where(is_bot, 0.5, 0.03), 0, gender)
    interests &= (r.random(n) >= np.where(is_bot, 0.6, 0.10))[:, None]
    signup = np.minimum(1 + r.exponential(420, n), 3000).astype(np.int64)
    return _Latent(seg, is_bot, inactive, act, fav, coupon_user, age, gender, region, interests, signup)


@dataclass
class _Race:
    teaser: np.ndarray
    join: np.ndarray
    enter: np.ndarray  # us relative to T-0
    view: np.ndarray
    t_view: np.ndarray
    click: np.ndarray
    t_click: np.ndarray
    attempt: np.ndarray
    t_attempt: np.ndarray


def _race(ctx: _Ctx, bucket: int, lat: _Latent) -> _Race:
    """Sale participation; pure in (seed, bucket, users) so pass 1 and pass 2 agree."""
    n = len(lat.seg)
    r = _rng(ctx.cfg.seed, bucket, _RACE)
    tbl, seg = ctx.tbl, lat.seg
    eligible = ~lat.inactive & ~lat.is_bot
    teaser = eligible & (r.random(n) < tbl["teaser"][seg])
    if ctx.preheat_us >= ctx.t0_us:
        teaser[:] = False
    join = eligible & (r.random(n) < np.where(teaser, 0.5, tbl["join_base"][seg]))
    early = r.random(n) < 0.55
    enter = np.where(early, r.uniform(-600, 120, n), np.minimum(r.exponential(720, n), 3540))
    view = join & (r.random(n) < 0.85)
    t_view = np.maximum(enter, 0) + 1 + r.exponential(15, n)
    click = view & (r.random(n) < 0.75)
    t_click = t_view + 1 + r.exponential(10, n)
    attempt = click & (r.random(n) < tbl["p_attempt"][seg])
    t_attempt = t_click + 0.5 + r.exponential(8, n)
    view &= t_view < 3600
    click &= t_click < 3600
    attempt &= t_attempt < 3600
    return _Race(
        teaser, join, _secs(enter), view, _secs(t_view), click, _secs(t_click), attempt, _secs(t_attempt)
    )


_COLS = ("uid", "ts", "etype", "item", "cat", "camp", "video", "order", "amount")
_DTYPES = (np.int64, np.int64, np.uint8, np.int64, np.int64, np.int64, np.int64, np.int64, np.int64)


class _Events:
    """Column buffers; 0 means null for ids, -1 for amount."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {c: [] for c in _COLS}

    def add(
        self,
        uidx: np.ndarray,
        ts: np.ndarray,
        etype: int,
        item: Any = 0,
        cat: Any = 0,
        camp: Any = 0,
        video: Any = 0,
        order: Any = 0,
        amount: Any = -1,
    ) -> None:
        n = len(uidx)
        if n == 0:
            return
        for name, value, dt in zip(
            _COLS, (uidx, ts, etype, item, cat, camp, video, order, amount), _DTYPES, strict=True
        ):
            arr = np.asarray(value, dtype=dt)
            self.parts[name].append(np.broadcast_to(arr, (n,)) if arr.ndim == 0 else arr)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for name, dt in zip(_COLS, _DTYPES, strict=True):
            out[name] = np.concatenate(self.parts[name]) if self.parts[name] else np.zeros(0, dtype=dt)
        return out


class _Orders:
    """Orders of one bucket from every source; ids are assigned once all are known."""

    _F = (
        "uidx",
        "ts",
        "item",
        "cat",
        "camp",
        "amount",
        "paid",
        "pay_ts",
        "refund",
        "refund_ts",
        "discount",
        "coupon_camp",
    )

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {f: [] for f in self._F}

    def add(self, **cols: Any) -> None:
        n = len(cols["uidx"])
        if n == 0:
            return
        for f in self._F:
            arr = np.asarray(cols[f])
            self.parts[f].append(np.broadcast_to(arr, (n,)) if arr.ndim == 0 else arr)

    def emit(self, uids: np.ndarray, ev: _Events) -> None:
        if not self.parts["uidx"]:
            return
        o = {f: np.concatenate(v) for f, v in self.parts.items()}
        order_id = (uids[o["uidx"]].astype(np.int64) << 24) | (_group_ordinal(o["uidx"]) + 1)
        ev.add(o["uidx"], o["ts"], _E.ORDER, o["item"], o["cat"], o["camp"], 0, order_id, o["amount"])
        red = o["discount"] > 0
        ev.add(
            o["uidx"][red],
            o["ts"][red],
            _E.COUPON_REDEEM,
            o["item"][red],
            o["cat"][red],
            o["coupon_camp"][red],
            0,
            order_id[red],
            o["discount"][red],
        )
        p = o["paid"].astype(bool)
        ev.add(
            o["uidx"][p],
            o["pay_ts"][p],
            _E.PAY,
            o["item"][p],
            o["cat"][p],
            o["camp"][p],
            0,
            order_id[p],
            o["amount"][p],
        )
        rf = p & o["refund"].astype(bool)
        ev.add(
            o["uidx"][rf],
            o["refund_ts"][rf],
            _E.REFUND,
            o["item"][rf],
            o["cat"][rf],
            o["camp"][rf],
            0,
            order_id[rf],
            o["amount"][rf],
        )


def _price_factor(ctx: _Ctx, item: np.ndarray, cat: np.ndarray, sens: np.ndarray) -> np.ndarray:
    rel = ctx.item_price[item - W.ITEM_ID_BASE] / ctx.cat_median[cat]
    return np.clip(rel ** (-sens), 0.15, 3.0)


def _background(ctx: _Ctx, bucket: int, lat: _Latent, ev: _Events, orders: _Orders) -> None:
    r = _rng(ctx.cfg.seed, bucket, _BACKGROUND)
    tbl, seg, n, days = ctx.tbl, lat.seg, len(lat.seg), ctx.cfg.days
    humans = ~lat.inactive & ~lat.is_bot
    p_act = np.clip(tbl["p_day"][seg] * np.sqrt(lat.act), 0.0, 0.95)
    active = (r.random((n, days)) < p_act[:, None]) & humans[:, None]
    ui, di = np.nonzero(active)
    s, a = seg[ui], lat.act[ui] * _VOLUME
    day0 = ctx.start_us + di.astype(np.int64) * DAY_US

    # Product views -> clicks -> carts -> orders -> pays -> refunds.
    nv = r.poisson(tbl["views"][s] * a)
    vu, vd = np.repeat(ui, nv), np.repeat(day0, nv)
    m = len(vu)
    vseg = seg[vu]
    vts = _diurnal(ctx, r, vd)
    vcat = np.where(r.random(m) < 0.35, lat.fav[vu], _rows(tbl["category_cdf"], vseg, r.random(m)))
    vitem = _pick_item(ctx, vcat, r.random(m))
    ad = r.random(m) < 0.15
    vcamp = np.where(ad, W.AD_CAMPAIGN_BASE + 2 * vcat + (r.random(m) < 0.5), 0)
    ev.add(vu, vts, _E.PRODUCT_VIEW, vitem, vcat + 1, vcamp)

    c = r.random(m) < tbl["p_click"][vseg]
    cu, cts, citem, ccat, ccamp = (
        vu[c],
        vts[c] + _secs(2 + r.exponential(20, c.sum())),
        vitem[c],
        vcat[c],
        vcamp[c],
    )
    ev.add(cu, cts, _E.CLICK, citem, ccat + 1, ccamp)

    cseg = seg[cu]
    pf = _price_factor(ctx, citem, ccat, tbl["price_sensitivity"][cseg])
    k = r.random(len(cu)) < np.clip(tbl["p_cart"][cseg] * pf, 0, 0.95)
    ku, kts, kitem, kcat, kcamp, kpf = (
        cu[k],
        cts[k] + _secs(10 + r.exponential(120, k.sum())),
        citem[k],
        ccat[k],
        ccamp[k],
        pf[k],
    )
    ev.add(ku, kts, _E.ADD_CART, kitem, kcat + 1, kcamp)

    kseg = seg[ku]
    o = r.random(len(ku)) < np.clip(tbl["p_order"][kseg] * np.sqrt(kpf), 0, 0.95)
    ou, oitem, ocat, ocamp = ku[o], kitem[o], kcat[o], kcamp[o]
    no = len(ou)
    ots = kts[o] + _secs(30 + r.exponential(600, no))
    qty = 1 + (r.random(no) < 0.10) + (r.random(no) < 0.02)
    gross = ctx.item_price[oitem - W.ITEM_ID_BASE] * qty
    redeem = lat.coupon_user[ou] & (r.random(no) < tbl["p_redeem"][seg[ou]])
    disc = np.minimum(np.minimum(np.maximum(np.rint(gross * 0.1 / 100) * 100, 300), 5000), gross // 2)
    disc = np.where(redeem, disc, 0).astype(np.int64)
    coupon_camp = W.COUPON_CAMPAIGN_BASE + r.integers(0, W.N_COUPON_CAMPAIGNS, no)
    paid = r.random(no) < 0.92
    pay_ts = ots + _secs(5 + r.exponential(60, no))
    refund = r.random(no) < 0.03
    refund_ts = pay_ts + _secs(r.uniform(2 * 3600, 72 * 3600, no))
    orders.add(
        uidx=ou,
        ts=ots,
        item=oitem,
        cat=ocat + 1,
        camp=ocamp,
        amount=gross - disc,
        paid=paid,
        pay_ts=pay_ts,
        refund=refund,
        refund_ts=refund_ts,
        discount=disc,
        coupon_camp=coupon_camp,
    )

    # Videos.
    nvid = r.poisson(tbl["videos"][s] * a)
    pu, pd = np.repeat(ui, nvid), np.repeat(day0, nvid)
    m = len(pu)
    pcat = np.where(r.random(m) < 0.5, lat.fav[pu], _rows(tbl["category_cdf"], seg[pu], r.random(m)))
    vid = _pick_video(ctx, pcat, r.random(m))
    pts = _diurnal(ctx, r, pd)
    pcamp = np.where(r.random(m) < 0.10, W.AD_CAMPAIGN_BASE + 2 * pcat, 0)
    ev.add(pu, pts, _E.VIDEO_PLAY, 0, pcat + 1, pcamp, vid)
    fin = r.random(m) < tbl["p_finish"][seg[pu]]
    dur = ctx.video_duration[vid[fin] - W.VIDEO_ID_BASE] * SEC
    ev.add(pu[fin], pts[fin] + dur, _E.VIDEO_FINISH, 0, pcat[fin] + 1, pcamp[fin], vid[fin])

    # Other merchants' live rooms.
    nl = r.poisson(tbl["lives"][s] * a)
    lu, ld = np.repeat(ui, nl), np.repeat(day0, nl)
    m = len(lu)
    lcat = np.where(r.random(m) < 0.6, lat.fav[lu], _rows(tbl["category_cdf"], seg[lu], r.random(m)))
    ev.add(lu, _diurnal(ctx, r, ld), _E.LIVE_ENTER, 0, lcat + 1, W.LIVE_ROOM_BASE + lcat)

    # Follows of creators (video id of the followed creator's video).
    nf = r.poisson(tbl["follows"][s] * a)
    fu, fd = np.repeat(ui, nf), np.repeat(day0, nf)
    m = len(fu)
    fvid = _pick_video(ctx, lat.fav[fu], r.random(m))
    ev.add(fu, _diurnal(ctx, r, fd), _E.FOLLOW, 0, lat.fav[fu] + 1, 0, fvid)

    # Platform coupon claims (coupon users only).
    nc = r.poisson(tbl["coupons"][s] * a) * lat.coupon_user[ui]
    qu, qd = np.repeat(ui, nc), np.repeat(day0, nc)
    m = len(qu)
    qk = r.integers(0, W.N_COUPON_CAMPAIGNS, m)
    ev.add(qu, _diurnal(ctx, r, qd), _E.COUPON_CLAIM, 0, 2 * qk + 1, W.COUPON_CAMPAIGN_BASE + qk)


def _sale(
    ctx: _Ctx, bucket: int, uids: np.ndarray, lat: _Latent, race: _Race, ev: _Events, orders: _Orders
) -> None:
    r = _rng(ctx.cfg.seed, bucket, _SALE)
    tbl, seg = ctx.tbl, lat.seg
    t0, t_end = ctx.t0_us, ctx.t0_us + HOUR_US
    hook, hook_cat = W.HOOK_ITEM_ID, W.HOOK_CATEGORY_ID
    live, preheat = W.LIVE_CAMPAIGN_ID, W.PREHEAT_CAMPAIGN_ID

    # Preheat: teaser plays/finishes, shop follows, reminder views of the hook item.
    tw = np.flatnonzero(race.teaser)
    if len(tw):
        plays = 1 + r.poisson(1.2, len(tw))
        pu = np.repeat(tw, plays)
        m = len(pu)
        window = t0 - ctx.preheat_us
        pts = t0 - 1 - (window * r.random(m) ** 1.7).astype(np.int64)
        which = (r.random(m) >= 0.6).astype(np.int64)
        vid = np.asarray(W.TEASER_VIDEO_IDS)[which]
        ev.add(pu, pts, _E.VIDEO_PLAY, 0, hook_cat, preheat, vid)
        fin = r.random(m) < np.minimum(tbl["p_finish"][seg[pu]] + 0.2, 0.95)
        dur = np.asarray(W.TEASER_DURATIONS_S)[which[fin]] * SEC
        ev.add(pu[fin], pts[fin] + dur, _E.VIDEO_FINISH, 0, hook_cat, preheat, vid[fin])
        starts = np.r_[0, np.cumsum(plays)[:-1]]
        first = np.minimum.reduceat(pts, starts)
        fol = r.random(len(tw)) < tbl["follow_shop"][seg[tw]]
        ev.add(
            tw[fol],
            first[fol] + _secs(5 + r.exponential(60, fol.sum())),
            _E.FOLLOW,
            0,
            hook_cat,
            preheat,
            W.TEASER_VIDEO_IDS[0],
        )
        rem = r.random(len(tw)) < 0.3
        ev.add(
            tw[rem],
            first[rem] + _secs(r.uniform(10, 600, rem.sum())),
            _E.PRODUCT_VIEW,
            hook,
            hook_cat,
            preheat,
        )

    j = np.flatnonzero(race.join)
    if len(j) == 0:
        return
    nj = len(j)
    enter = t0 + race.enter[j]
    ev.add(j, enter, _E.LIVE_ENTER, 0, hook_cat, live)
    again = r.poisson(0.5, nj)
    au = np.repeat(np.arange(nj), again)
    lo = np.maximum(enter[au], t0)
    ev.add(j[au], lo + (r.random(len(au)) * (t_end - lo)).astype(np.int64), _E.LIVE_ENTER, 0, hook_cat, live)
    lf = r.random(nj) < 0.08
    ev.add(
        j[lf],
        np.maximum(enter[lf], t0) + _secs(30 + r.exponential(300, lf.sum())),
        _E.FOLLOW,
        0,
        hook_cat,
        live,
    )

    # The hook item: views, clicks, and the stock race decided in pass 1.
    v = np.flatnonzero(race.view)
    ev.add(v, t0 + race.t_view[v], _E.PRODUCT_VIEW, hook, hook_cat, live)
    c = np.flatnonzero(race.click)
    ev.add(c, t0 + race.t_click[c], _E.CLICK, hook, hook_cat, live)
    att = np.flatnonzero(race.attempt)
    won = np.isin(uids[att], ctx.winners)
    w = att[won]
    nw = len(w)
    ots = t0 + race.t_attempt[w]
    pay_ts = ots + _secs(3 + r.exponential(15, nw))
    orders.add(
        uidx=w,
        ts=ots,
        item=hook,
        cat=hook_cat,
        camp=live,
        amount=W.HOOK_SALE_PRICE_FEN,
        paid=True,
        pay_ts=pay_ts,
        refund=r.random(nw) < 0.04,
        refund_ts=pay_ts + _secs(r.uniform(3 * 3600, 40 * 3600, nw)),
        discount=0,
        coupon_camp=0,
    )
    lost = att[~won]
    cart = r.random(len(lost)) < 0.5
    ev.add(lost[cart], t0 + race.t_attempt[lost[cart]], _E.ADD_CART, hook, hook_cat, live)

    # Live-room coupon and the rest of the live assortment (the jacket most of all).
    open_at = np.maximum(enter, t0)
    claim = r.random(nj) < tbl["p_live_coupon"][seg[j]]
    claim_ts = open_at + _secs(5 + r.exponential(90, nj))
    claim &= claim_ts < t_end
    ev.add(j[claim], claim_ts[claim], _E.COUPON_CLAIM, 0, hook_cat, W.LIVE_COUPON_CAMPAIGN_ID)
    loser = np.zeros(len(uids), dtype=bool)
    loser[lost] = True
    k = r.poisson(1.2 + 0.8 * loser[j])
    xi = np.repeat(np.arange(nj), k)
    m = len(xi)
    xu = j[xi]
    item = ctx.live_items[np.searchsorted(ctx.live_weights, r.random(m), side="right")]
    icat = ctx.item_cat[item - W.ITEM_ID_BASE]
    xts = open_at[xi] + (r.random(m) * (t_end - open_at[xi])).astype(np.int64)
    ev.add(xu, xts, _E.PRODUCT_VIEW, item, icat + 1, live)
    cl = r.random(m) < 0.5
    cts = xts[cl] + _secs(1 + r.exponential(15, cl.sum()))
    ev.add(xu[cl], cts, _E.CLICK, item[cl], icat[cl] + 1, live)
    cu, citem, ccat, cxi = xu[cl], item[cl], icat[cl], xi[cl]
    pf = _price_factor(ctx, citem, ccat, tbl["price_sensitivity"][seg[cu]])
    ca = r.random(len(cu)) < np.clip(0.3 * pf, 0, 0.9)
    kts = cts[ca] + _secs(2 + r.exponential(30, ca.sum()))
    ev.add(cu[ca], kts, _E.ADD_CART, citem[ca], ccat[ca] + 1, live)
    ku, kitem, kcat, kxi = cu[ca], citem[ca], ccat[ca], cxi[ca]
    od = r.random(len(ku)) < np.clip(0.35 * np.sqrt(pf[ca]), 0, 0.9)
    ou, oitem, ocat, oxi = ku[od], kitem[od], kcat[od], kxi[od]
    no = len(ou)
    ots = kts[od] + _secs(5 + r.exponential(60, no))
    price = ctx.item_price[oitem - W.ITEM_ID_BASE]
    use = claim[oxi] & (claim_ts[oxi] <= ots) & (price >= W.LIVE_COUPON_THRESHOLD_FEN)
    disc = np.where(use, W.LIVE_COUPON_DISCOUNT_FEN, 0)
    pay_ts = ots + _secs(3 + r.exponential(30, no))
    orders.add(
        uidx=ou,
        ts=ots,
        item=oitem,
        cat=ocat + 1,
        camp=live,
        amount=price - disc,
        paid=r.random(no) < 0.92,
        pay_ts=pay_ts,
        refund=r.random(no) < 0.04,
        refund_ts=pay_ts + _secs(r.uniform(3 * 3600, 40 * 3600, no)),
        discount=disc,
        coupon_camp=W.LIVE_COUPON_CAMPAIGN_ID,
    )


def _bots(ctx: _Ctx, bucket: int, lat: _Latent, ev: _Events) -> None:
    b = np.flatnonzero(lat.is_bot)
    if len(b) == 0:
        return
    r = _rng(ctx.cfg.seed, bucket, _BOTS)
    nb, days, k_sale = len(b), ctx.cfg.days, ctx.cfg.sale_day_index
    sale_bot = r.random(nb) < 0.5
    active = r.random((nb, days)) < 0.65
    active[:, k_sale] |= sale_bot
    bi, di = np.nonzero(active)
    on_sale = sale_bot[bi] & (di == k_sale)
    nd = len(bi)
    if nd == 0:
        return
    count = np.where(on_sale, r.integers(200, 360, nd), r.integers(100, 280, nd))
    interval = np.where(on_sale, r.uniform(6, 15, nd), r.uniform(15, 60, nd))
    span = count * interval
    day0 = ctx.start_us + di.astype(np.int64) * DAY_US
    start = np.where(
        on_sale,
        ctx.t0_us - _secs(r.uniform(0, 600, nd)),
        day0 + _secs(r.uniform(0, 1, nd) * np.maximum(0, 86_400 - span)),
    )
    ev.add(b[bi[on_sale]], start[on_sale] - SEC, _E.LIVE_ENTER, 0, W.HOOK_CATEGORY_ID, W.LIVE_CAMPAIGN_ID)
    ci = np.repeat(np.arange(nd), count)
    m = len(ci)
    seq = np.arange(m) - np.repeat(np.r_[0, np.cumsum(count)[:-1]], count)
    ts = start[ci] + _secs(seq * interval[ci] + r.uniform(-0.05, 0.05, m))
    item = W.ITEM_ID_BASE + r.integers(0, W.N_ITEMS, m)
    cat = ctx.item_cat[item - W.ITEM_ID_BASE]
    camp = np.where(r.random(m) < 0.6, W.AD_CAMPAIGN_BASE + 2 * cat + (r.random(m) < 0.5), 0)
    in_sale = on_sale[ci] & (ts >= ctx.t0_us) & (ts < ctx.t0_us + HOUR_US)
    live_pick = np.where(
        r.random(m) < 0.6, W.HOOK_ITEM_ID, ctx.live_items[r.integers(0, len(ctx.live_items), m)]
    )
    item = np.where(in_sale, live_pick, item)
    cat = np.where(in_sale, ctx.item_cat[item - W.ITEM_ID_BASE], cat)
    camp = np.where(in_sale, W.LIVE_CAMPAIGN_ID, camp)
    ev.add(b[bi[ci]], ts, _E.CLICK, item, cat + 1, camp)


@dataclass
class _BucketOut:
    uids: np.ndarray
    lat: _Latent
    events: dict[str, np.ndarray]  # sorted by (uid, ts, etype), uid is the real user id
    n_events: np.ndarray  # per user


def _simulate_bucket(ctx: _Ctx, bucket: int, uids: np.ndarray) -> _BucketOut:
    lat = _latent(ctx, bucket, len(uids))
    ev, orders = _Events(), _Orders()
    if len(uids):
        _background(ctx, bucket, lat, ev, orders)
        _sale(ctx, bucket, uids, lat, _race(ctx, bucket, lat), ev, orders)
        _bots(ctx, bucket, lat, ev)
        orders.emit(uids, ev)
    a = ev.arrays()
    keep = (a["ts"] >= ctx.start_us) & (a["ts"] < ctx.end_us)
    a = {k: v[keep] for k, v in a.items()}
    order = np.lexsort((a["etype"], a["ts"], a["uid"]))
    a = {k: v[order] for k, v in a.items()}
    n_events = np.bincount(a["uid"], minlength=len(uids)).astype(np.int64)
    a["uid"] = uids[a["uid"]].astype(np.int64)
    return _BucketOut(uids, lat, a, n_events)


# ---------------------------------------------------------------------------------------------------
# Identities (raw values are recomputable from (seed, user_id) but never written).

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _luhn_digit(digits: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return str((10 - total % 10) % 10)


def _uuid(h1: int, h2: int) -> str:
    x = f"{h1:016x}{h2:016x}"
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


_EMAIL_WORDS = ("lily", "wang", "chen", "zhang", "mei", "jun", "hao", "xiao", "li", "yun", "ming", "fang")
_EMAIL_DOMAINS = ("qq.com", "163.com", "126.com", "gmail.com", "outlook.com", "sina.com")


def synthetic_identities(user_ids: np.ndarray | list[int], seed: int) -> list[tuple[int, IdType, str]]:
    """Raw identifiers of simulated users, recomputed from ``(seed, user_id)``.

    The generator writes only their keyed hashes (identity map); the demo and tests call this to build
    realistic uploads (raw phones in assorted formats, upper-case IDFAs, e-mails with spaces) that
    match known users. Each user has a unique phone number (85% of users have one), Android users
    an OAID (and some an IMEI), iOS users with tracking allowed an IDFA, 25% an e-mail.
    """
    return [(u, IdType(t), raw) for u, t, raw, _norm in _synthetic(user_ids, seed)]


def _synthetic(user_ids: np.ndarray | list[int], seed: int) -> list[tuple[int, int, str, str]]:
    """``(user_id, id_type, raw, normalised)``; ``normalised == identity.normalise(id_type, raw)``."""
    uids = np.asarray(user_ids, dtype=np.uint64)
    salt = np.uint64((seed * 0x2545F4914F6CDD1D + 0x1234567) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        base = uids * np.uint64(0x100000001B3) ^ salt
    h = [_mix64(base + np.uint64(k)).tolist() for k in range(8)]  # Python ints: fast scalar access
    seed_off = (seed * 104_729) % 1_000_000_000
    phone, oaid, imei, idfa, email = (int(t) for t in (IdType.PHONE, IdType.OAID, IdType.IMEI, IdType.IDFA,
                                                       IdType.EMAIL))  # fmt: skip
    n_words, n_domains = len(_EMAIL_WORDS), len(_EMAIL_DOMAINS)
    out: list[tuple[int, int, str, str]] = []
    append = out.append
    for u, h0, h1, h2, h3, h4, h5, h6, h7 in zip(uids.tolist(), *h, strict=True):
        r0, r1, r2, r3 = h0 % 10_000, h1 % 10_000, h2 % 10_000, h3 % 10_000
        android = r1 < 7_200
        if r0 < 8_500:
            mobile = f"1{'3456789'[h4 % 7]}{(u * 738_197_629 + seed_off) % 1_000_000_000:09d}"
            fmt = (h4 >> 40) % 5
            if fmt == 0:
                raw = mobile
            elif fmt == 1:
                raw = f"+86 {mobile[:3]}-{mobile[3:7]}-{mobile[7:]}"
            elif fmt == 2:
                raw = f"0086{mobile}"
            elif fmt == 3:
                raw = f"{mobile[:3]} {mobile[3:7]} {mobile[7:]}"
            else:
                raw = f"+86{mobile}"
            append((u, phone, raw, "86" + mobile))
        if android and r2 < 9_000:
            value = _uuid(h5, h6)
            append((u, oaid, value.upper() if r3 % 2 else value, value))
        if android and r2 % 10 < 3:
            body = f"86{h7 % 10**12:012d}"
            value = body + _luhn_digit(body)
            append((u, imei, value, value))
        if not android and r2 < 5_500:
            value = _uuid(h6, h5)
            append((u, idfa, value.upper(), value))
        if r3 < 2_500:
            word = _EMAIL_WORDS[(h7 >> 50) % n_words]
            dom = _EMAIL_DOMAINS[(h5 >> 55) % n_domains]
            value = f"{word}.{(u * 2_654_435_761 + seed_off) % 1_000_000_000:09d}@{dom}"
            append((u, email, f" {value.title()} " if r3 % 3 == 0 else value, value))
    return out


# ---------------------------------------------------------------------------------------------------
# Writing.


def _iso_us(us: int) -> str:
    return (
        (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(us)))
        .isoformat()
        .replace("+00:00", "Z")
    )


def _null_if(arr: np.ndarray, typ: pa.DataType, null: np.ndarray) -> pa.Array:
    return pa.array(arr.astype(typ.to_pandas_dtype(), copy=False), type=typ, mask=null)


def _events_table(a: dict[str, np.ndarray], bucket: np.ndarray, event_id: np.ndarray) -> pl.DataFrame:
    t = pa.table(
        {
            "event_id": pa.array(event_id.astype(np.uint64), pa.uint64()),
            "user_id": pa.array(a["uid"].astype(np.uint32), pa.uint32()),
            "bucket": pa.array(bucket, pa.uint8()),
            "ts": pa.array(a["ts"], pa.timestamp("us", tz="UTC")),
            "event_type": pa.array(a["etype"], pa.uint8()),
            "item_id": _null_if(a["item"], pa.uint32(), a["item"] == 0),
            "category_id": _null_if(a["cat"], pa.uint32(), a["cat"] == 0),
            "campaign_id": _null_if(a["camp"], pa.uint32(), a["camp"] == 0),
            "video_id": _null_if(a["video"], pa.uint32(), a["video"] == 0),
            "order_id": _null_if(a["order"], pa.uint64(), a["order"] == 0),
            "amount_fen": _null_if(a["amount"], pa.int64(), a["amount"] < 0),
        }
    )
    # A generated world is the platform's own behaviour stream.
    return pl.from_arrow(t).with_columns(pl.lit(PLATFORM_OWNER, dtype=pl.Utf8).alias(OWNER))  # type: ignore[union-attr]


def _chunk_buckets(all_buckets: np.ndarray, lo: int, hi: int) -> list[tuple[int, np.ndarray]]:
    """``[(bucket, sorted user ids)]`` for buckets lo..hi-1 (users are 1..N, all_buckets[i] is user i+1's)."""
    idx = np.flatnonzero((all_buckets >= lo) & (all_buckets < hi))
    b = all_buckets[idx]
    order = np.argsort(b, kind="stable")
    idx, b = idx[order], b[order]
    counts = np.bincount(b, minlength=hi)[lo:hi]
    bounds = np.r_[0, np.cumsum(counts)]
    return [(lo + i, (idx[bounds[i] : bounds[i + 1]] + 1).astype(np.int64)) for i in range(hi - lo)]


def _sale_race(ctx: _Ctx, all_buckets: np.ndarray, on_chunk: Callable[[int, int], None]) -> dict[str, Any]:
    """Pass 1: decide the ``HOOK_STOCK`` winners over the whole population."""
    users, times = [], []
    seen = 0
    for k in range(ctx.cfg.n_chunks):
        lo, hi = Shard(k, ctx.cfg.n_chunks).bucket_range()
        for bucket, uids in _chunk_buckets(all_buckets, lo, hi):
            lat = _latent(ctx, bucket, len(uids))
            race = _race(ctx, bucket, lat)
            users.append(uids[race.attempt])
            times.append(race.t_attempt[race.attempt])
            seen += len(uids)
        on_chunk(k, seen)
    u = np.concatenate(users) if users else np.zeros(0, np.int64)
    t = np.concatenate(times) if times else np.zeros(0, np.int64)
    order = np.lexsort((u, t))
    win = order[: W.HOOK_STOCK]
    ctx.winners = np.sort(u[win])
    sold_out = None
    if len(u) >= W.HOOK_STOCK:
        sold_out = _iso_us(ctx.t0_us + int(t[order[W.HOOK_STOCK - 1]]))
    return {
        "hook_attempts": len(u),
        "hook_sold": len(win),
        "hook_sold_out_at": sold_out,
        "hook_sold_out_after_s": None
        if sold_out is None
        else round(int(t[order[W.HOOK_STOCK - 1]]) / SEC, 3),
    }


def _profiles_frame(uids: np.ndarray, lat: _Latent, start_date: date) -> pl.DataFrame:
    tags = INTEREST_TAGS
    signup = np.datetime64(start_date.isoformat(), "D") - lat.signup_days_before.astype("timedelta64[D]")
    df = pl.DataFrame(
        {
            "user_id": pl.Series(uids, dtype=pl.UInt32),
            "age_band": pl.Series(lat.age, dtype=pl.UInt8),
            "gender": pl.Series(lat.gender, dtype=pl.UInt8),
            "region": pl.Series(np.asarray(W.REGIONS)[lat.region], dtype=pl.Utf8),
            **{f"_t{i}": pl.Series(lat.interests[:, i]) for i in range(len(tags))},
            "signup_date": pl.Series(signup).cast(pl.Date),
        }
    )
    interests = pl.concat_list(
        [
            pl.when(pl.col(f"_t{i}")).then(pl.lit(tag)).otherwise(pl.lit(None, pl.Utf8))
            for i, tag in enumerate(tags)
        ]
    ).list.drop_nulls()
    return df.with_columns(interests=interests).select(
        "user_id", "age_band", "gender", "region", "interests", "signup_date"
    )


def _identity_frame(uids: np.ndarray, seed: int, pepper: Pepper) -> pl.DataFrame:
    """Identity-map rows of ``uids``: keyed hashes only (``IDENTITY_SCHEMA``); raw ids stay in memory."""
    rows = _synthetic(uids, seed)
    keyed = [key_normalised(pepper, norm) for _u, _t, _raw, norm in rows]
    return pl.DataFrame(
        {
            "user_id": pl.Series([r[0] for r in rows], dtype=pl.UInt32),
            "id_type": pl.Series([r[1] for r in rows], dtype=pl.UInt8),
            "key_sha256": pl.Series([k[0] for k in keyed], dtype=pl.Utf8),
            "key_md5": pl.Series([k[1] for k in keyed], dtype=pl.Utf8),
            "pepper_id": pl.Series([pepper.id] * len(rows), dtype=pl.Utf8),
        }
    )


class _Progress:
    """Rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool, total_chunks: int, users: int) -> None:
        self.enabled = enabled
        self.t0 = time.monotonic()
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("chunks {task.fields[users]:>11,} users {task.fields[events]:>12,} events"),
            TextColumn("{task.fields[rate]:>9,.0f} ev/s"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.progress.start()
        self.race = self.progress.add_task("sale race", total=total_chunks, users=0, events=0, rate=0.0)
        self.main = self.progress.add_task("generate", total=total_chunks, users=0, events=0, rate=0.0)

    def race_chunk(self, k: int, users: int) -> None:
        if self.enabled:
            self.progress.update(self.race, completed=k + 1, users=users)

    def chunk(self, k: int, users: int, events: int) -> None:
        if self.enabled:
            rate = events / max(1e-9, time.monotonic() - self.t0)
            self.progress.update(self.main, completed=k + 1, users=users, events=events, rate=rate)

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text)

    def stop(self) -> None:
        if self.enabled:
            self.progress.stop()


def generate(
    store: ObjectStore,
    config: GenConfig,
    *,
    progress: bool = False,
    overwrite: bool = False,
    tmp_dir: str | Path | None = None,
    pepper: Pepper | None = None,
    table_format: str | None = None,
) -> GenResult:
    """Generate the dataset described by ``config`` into ``store`` under ``config.prefix``.

    Raises ``DatasetExistsError`` if a dataset is already there (unless ``overwrite``). Memory is
    bounded by the chunk size (about ``chunk_users`` users' events at a time) plus the population's
    bucket array (1 byte per user). The identity map is keyed under ``pepper`` (default:
    ``load_pepper()``, which raises ``ConfigError`` for a bad ``FLASHCROWD_IDENTITY_PEPPER``).
    """
    t_start = time.monotonic()
    cfg = config
    pepper = pepper if pepper is not None else load_pepper()
    table_format = table_format or default_table_format()
    clear_dataset(store, cfg.prefix, overwrite)
    ctx = _make_ctx(cfg)
    all_buckets = buckets_np(np.arange(1, cfg.users + 1, dtype=np.uint32))
    n_chunks = cfg.n_chunks
    bar = _Progress(progress, n_chunks, cfg.users)
    tmp = Path(tempfile.mkdtemp(prefix="flashcrowd-gen-", dir=tmp_dir))
    try:
        story = _sale_race(ctx, all_buckets, bar.race_chunk)
        writer = open_sink(table_format, store, cfg.prefix, tmp, cfg.row_group_size)
        total_events = 0
        users_done = 0
        by_type = np.zeros(len(EventType) + 1, dtype=np.int64)
        active_users = bots = 0
        hook_pays = 0
        for k in range(n_chunks):
            lo, hi = Shard(k, n_chunks).bucket_range()
            outs = [_simulate_bucket(ctx, b, uids) for b, uids in _chunk_buckets(all_buckets, lo, hi)]
            uids = np.concatenate([o.uids for o in outs])
            ev = {c: np.concatenate([o.events[c] for o in outs]) for c in _COLS}
            buckets = np.concatenate(
                [
                    np.full(len(o.events["uid"]), b, dtype=np.uint8)
                    for b, o in zip(range(lo, hi), outs, strict=True)
                ]
            )
            n_events = np.concatenate([o.n_events for o in outs])
            seg = np.concatenate([o.lat.seg for o in outs])
            is_bot = np.concatenate([o.lat.is_bot for o in outs])
            starts = (
                np.flatnonzero(np.r_[True, ev["uid"][1:] != ev["uid"][:-1]])
                if len(ev["uid"])
                else np.zeros(0, np.int64)
            )
            counts = np.diff(np.r_[starts, len(ev["uid"])])
            ordinal = np.arange(len(ev["uid"])) - np.repeat(starts, counts)
            event_id = (ev["uid"] << 24) | ordinal
            day = ((ev["ts"] - ctx.start_us) // DAY_US).astype(np.uint16)
            order = np.argsort(day, kind="stable")
            bounds = np.searchsorted(day[order], np.arange(cfg.days + 1))
            for d in range(cfg.days):
                sel = order[bounds[d] : bounds[d + 1]]
                sub = {c: v[sel] for c, v in ev.items()}
                dt = (cfg.start_date + timedelta(days=d)).isoformat()
                df = _events_table(sub, buckets[sel], event_id[sel])
                writer.write(
                    "events",
                    f"events/dt={dt}/part-{k:05d}.parquet",
                    df,
                    dt=dt,
                    uids=sub["uid"],
                    buckets=buckets[sel],
                    ts=sub["ts"],
                )
            chunk_buckets = buckets_np(uids)
            prof = _profiles_frame(uids, _concat_latent([o.lat for o in outs]), cfg.start_date)
            writer.write(
                "profiles", f"profiles/part-{k:05d}.parquet", prof, dt=None, uids=uids, buckets=chunk_buckets
            )
            ident = _identity_frame(uids, cfg.seed, pepper)
            iu = ident.get_column("user_id").to_numpy()
            writer.write(
                "identity", f"identity/part-{k:05d}.parquet", ident, dt=None, uids=iu, buckets=buckets_np(iu)
            )
            truth = pl.DataFrame(
                {
                    "user_id": pl.Series(uids, dtype=pl.UInt32),
                    "segment": pl.Series(seg, dtype=pl.UInt8),
                    "is_bot": pl.Series(is_bot, dtype=pl.Boolean),
                    "n_events": pl.Series(n_events, dtype=pl.UInt32),
                }
            )
            writer.write(
                "truth_segments",
                f"truth/segments/part-{k:05d}.parquet",
                truth,
                dt=None,
                uids=uids,
                buckets=chunk_buckets,
            )
            total_events += len(ev["uid"])
            users_done += len(uids)
            by_type += np.bincount(ev["etype"], minlength=len(by_type))
            active_users += int((n_events > 0).sum())
            bots += int(is_bot.sum())
            hook_pays += int(
                (
                    (ev["etype"] == _E.PAY)
                    & (ev["item"] == W.HOOK_ITEM_ID)
                    & (ev["amount"] == W.HOOK_SALE_PRICE_FEN)
                ).sum()
            )
            writer.end_chunk()
            del outs, ev, buckets, order
            bar.chunk(k, users_done, total_events)
        story["hook_pays_at_sale_price"] = hook_pays
        marker = "lake.json" if writer.format == "delta" else "manifest.json"
        bar.note(f"publishing ({writer.format}: data first, {marker} last)...")
        world_bytes = json.dumps(ctx.world, sort_keys=True, indent=1, ensure_ascii=False).encode("utf-8")
        manifest = {
            "prefix": cfg.prefix,
            "population": cfg.users,
            "days": [(cfg.start_date + timedelta(days=d)).isoformat() for d in range(cfg.days)],
            "start": ctx.world["start"],
            "end": ctx.world["end"],
            "world": cfg.prefix + "world.json",
            "buckets": NUM_BUCKETS,
            "bucket_hash": "((user_id * 0x9E3779B1) & 0xFFFFFFFF) >> 24",
            "sort_key": ["bucket", "user_id", "ts"],
            "generator": cfg.as_dict(),
            # How identity/ is keyed (services.events.identity); the id is public, the pepper is not.
            "identity_keys": {"hmac": "sha256", "message": "raw digest", "pepper_id": pepper.id},
            "stats": {
                "events": total_events,
                "events_by_type": {EventType(i).label: int(by_type[i]) for i in range(1, len(by_type))},
                "users": cfg.users,
                "active_users": active_users,
                "bots": bots,
                "story": story,
            },
        }
        document = writer.publish(manifest, world_bytes)
    finally:
        bar.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f["size"] for f in document["files"])
    return GenResult(
        manifest=document,
        events=total_events,
        users=cfg.users,
        files=len(document["files"]),
        bytes=size,
        seconds=time.monotonic() - t_start,
        peak_rss_bytes=peak_rss_bytes(),
        story=story,
    )


def _concat_latent(lats: list[_Latent]) -> _Latent:
    return _Latent(**{f: np.concatenate([getattr(x, f) for x in lats]) for f in _Latent.__dataclass_fields__})
