"""The compiled queries: pushdown into the Parquet scan, day pruning, shard predicates, the plan."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import numpy as np
from pyroaring import BitMap

from services.audience.compiler import (
    EventLeaf,
    PackLeaf,
    RefundedPayersLeaf,
    SetOp,
    Window,
    combine,
    compile_spec,
    event_query,
    ids_to_bitmap,
    profile_query,
)
from services.audience.spec_io import spec_from_data
from services.events.sharding import Shard
from tests.audience.conftest import World

END = datetime(2025, 6, 15, tzinfo=UTC)


def _scan_section(plan: str) -> str:
    """The Parquet SCAN node of an explained plan, with its PROJECT and SELECTION lines."""
    start = plan.index("Parquet SCAN")
    return plan[start:]


def test_filter_and_projection_reach_the_scan(world: World) -> None:
    spec = spec_from_data(
        {
            "exclude": {
                "base": {
                    "shortcut": {
                        "kind": "clickers",
                        "window": {"last": "24h"},
                        "filter": {"campaignIds": [900002]},
                    }
                },
                "subtract": [{"behavior": {"eventTypes": ["pay"], "window": {"last": "24h"}}}],
            }
        }
    )
    plan = compile_spec(spec, as_of=END)
    compiled = event_query(world.dataset, [leaf for leaf in plan.leaves if isinstance(leaf, EventLeaf)])
    assert compiled is not None
    query, grouped = compiled
    assert not grouped
    scan = _scan_section(query.explain())
    # Only the last day's partition is opened.
    assert "dt=2025-06-14" in scan and "dt=2025-06-13" not in scan and "dt=2025-06-12" not in scan
    # Projection: user_id, ts, event_type, campaign_id of the 12 columns (no owner filter: the
    # generated world's parts hold platform events only).
    assert re.search(r"PROJECT 4/12 COLUMNS", scan)
    selection = scan[scan.index("SELECTION") :]
    assert 'col("ts") >= 2025-06-14 00:00:00 UTC' in selection
    assert 'col("event_type")' in selection and 'col("campaign_id")' in selection


def test_shard_predicate_reaches_the_scan(world: World) -> None:
    leaf = EventLeaf(
        compile_spec(spec_from_data({"shortcut": {"kind": "clickers", "window": {"last": "48h"}}}), as_of=END)
        .leaves[0]
        .conditions,
        Window(END - timedelta(days=2), END),
    )
    query, _ = event_query(world.dataset, [leaf], Shard(1, 4))  # type: ignore[misc]
    selection = _scan_section(query.explain())
    lo, hi = Shard(1, 4).bucket_range()
    assert f'col("bucket") >= {lo}' in selection and f'col("bucket") < {hi}' in selection
    profiles = profile_query(
        world.dataset,
        compile_spec(spec_from_data({"profile": {"genders": ["female"]}}), as_of=END).leaves[0],
        Shard(1, 4),
    )
    assert "gender" in _scan_section(profiles.explain()).split("SELECTION")[1]


def test_window_outside_the_data_reads_nothing(world: World) -> None:
    leaf = EventLeaf(
        compile_spec(spec_from_data({"shortcut": {"kind": "clickers", "window": {"last": "1h"}}}), as_of=END)
        .leaves[0]
        .conditions,
        Window(END + timedelta(days=1), END + timedelta(days=2)),
    )
    assert event_query(world.dataset, [leaf]) is None


def test_plan_shares_equal_leaves_and_resolves_windows() -> None:
    clickers = {"shortcut": {"kind": "clickers", "window": {"last": "24h"}}}
    spec = spec_from_data(
        {
            "union": {
                "operands": [
                    {"intersect": {"operands": [clickers, {"pack": {"pack": "tenants/a/packs/p"}}]}},
                    {
                        "exclude": {
                            "base": clickers,
                            "subtract": [{"shortcut": {"kind": "purchasers", "window": {"last": "24h"}}}],
                        }
                    },
                ]
            }
        }
    )
    plan = compile_spec(spec, as_of=END)
    kinds = [type(leaf).__name__ for leaf in plan.leaves]
    assert kinds == ["EventLeaf", "PackLeaf", "EventLeaf", "RefundedPayersLeaf"]  # clickers once
    refunded = next(leaf for leaf in plan.leaves if isinstance(leaf, RefundedPayersLeaf))
    assert refunded.window == Window(END - timedelta(hours=24), END) and refunded.horizon == END
    assert plan.references == [PackLeaf("tenants/a/packs/p", 0)]
    assert isinstance(plan.root, SetOp) and plan.root.op == "union"
    windows = plan.resolved_spec.union.operands[0].intersect.operands[0].shortcut.window
    assert windows.absolute.start_time.ToDatetime(UTC) == END - timedelta(hours=24)
    assert (
        spec.union.operands[0].intersect.operands[0].shortcut.window.WhichOneof("window") == "last"
    )  # untouched


def test_combine_and_bitmaps() -> None:
    a, b, c = PackLeaf("a"), PackLeaf("b"), PackLeaf("c")
    maps = {a: BitMap([1, 2, 3, 4]), b: BitMap([3, 4, 5]), c: BitMap([4])}
    assert combine(SetOp("union", (a, b)), maps) == BitMap([1, 2, 3, 4, 5])
    assert combine(SetOp("intersect", (a, b, c)), maps) == BitMap([4])
    assert combine(SetOp("exclude", (a, b, c)), maps) == BitMap([1, 2])
    assert maps[a] == BitMap([1, 2, 3, 4])  # inputs untouched
    ids = np.array([5, 3, 3, 2**32 - 1], dtype=np.int64)
    assert (
        ids_to_bitmap(ids) == BitMap([3, 5, 2**32 - 1])
        and len(ids_to_bitmap(np.array([], dtype=np.uint32))) == 0
    )


def test_grouped_and_row_modes_agree(world: World) -> None:
    # Big scans aggregate per user inside the query; both modes must give the same sets.
    spec = spec_from_data(
        {
            "union": {
                "operands": [
                    {"shortcut": {"kind": "clickers", "window": {"last": "48h"}}},
                    {"shortcut": {"kind": "video_viewers", "window": {"last": "24h"}}},
                ]
            }
        }
    )
    leaves = [leaf for leaf in compile_spec(spec, as_of=END).leaves if isinstance(leaf, EventLeaf)]
    rows, row_mode = event_query(world.dataset, leaves, grouped=False)  # type: ignore[misc]
    users, group_mode = event_query(world.dataset, leaves, grouped=True)  # type: ignore[misc]
    assert (row_mode, group_mode) == (False, True)
    by_row, by_user = rows.collect(), users.collect()
    for k in range(len(leaves)):
        want = set(by_row.filter(by_row[f"f{k}"])["user_id"].to_list())
        assert set(by_user.filter(by_user[f"f{k}"] >= 1)["user_id"].to_list()) == want and want
    assert by_user["_events"].sum() == by_row.height
