"""The seed story's pack specs, written as the same JSON/YAML documents a batch job would use.

Times come from the generated world (``world.json``), so the specs stay right for any seed or
start date.
"""

from __future__ import annotations

from typing import Any

SALE_HOUR = "sale"  # the sale window [sale.start, sale.end)


def _window(world: dict[str, Any], which: str) -> dict[str, Any]:
    sale = world["sale"]
    if which == SALE_HOUR:
        return {"absolute": {"startTime": sale["start"], "endTime": sale["end"]}}
    if which == "preheat":  # teaser days up to T-0
        return {"absolute": {"startTime": sale["preheat_start"], "endTime": sale["start"]}}
    if which == "sale_day_on":  # from T-0 to the end of the data (refunds come later)
        return {"absolute": {"startTime": sale["start"], "endTime": world["end"]}}
    raise ValueError(which)


def story_specs(world: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(pack id, display name, spec document) in build order; later ones reference earlier ones."""
    sale = world["sale"]
    live_items = sale["live_item_ids"]
    return [
        (
            "teaser-viewers",
            "Watched a teaser before T-0",
            {
                "shortcut": {
                    "kind": "KIND_VIDEO_VIEWERS",
                    "window": _window(world, "preheat"),
                    "filter": {"videoIds": sale["teaser_video_ids"]},
                }
            },
        ),
        (
            "sale-hour-clickers",
            "Clicked a live-room item in the sale hour",
            {
                "shortcut": {
                    "kind": "KIND_CLICKERS",
                    "window": _window(world, SALE_HOUR),
                    "filter": {"itemIds": live_items},
                }
            },
        ),
        (
            "purchasers",
            "Paid for a live-room item (not fully refunded)",
            {
                "shortcut": {
                    "kind": "KIND_PURCHASERS",
                    "window": _window(world, "sale_day_on"),
                    "filter": {"itemIds": live_items},
                }
            },
        ),
        (
            "clickers-not-buyers",
            "Clicked in the sale hour, did not buy",
            {
                "exclude": {
                    "base": {"pack": {"pack": "{tenant}/packs/sale-hour-clickers"}},
                    "subtract": [{"pack": {"pack": "{tenant}/packs/purchasers"}}],
                }
            },
        ),
        (
            "women-25-35-apparel-deals",
            "Women 25-35 interested in apparel deals",
            {
                "intersect": {
                    "operands": [
                        {
                            "profile": {
                                "genders": ["GENDER_FEMALE"],
                                "ageBands": ["AGE_BAND_25_30", "AGE_BAND_31_35"],
                                "interests": ["apparel"],
                            }
                        },
                        {"profile": {"interests": ["deals"]}},
                    ]
                }
            },
        ),
    ]
