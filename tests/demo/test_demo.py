"""``flashcrowd demo`` end to end: the whole story as a subprocess on a small world, output checked.

30,000 users is a small world where every step has something to show with seed 7: the hook T-shirt
sells out (T+2 min), the clickers-not-buyers pack is above the persona privacy minimum, and the
lookalike has a seed. Stdout is not a terminal here, so the live view prints one line per
simulated minute (what CI logs show).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MINUTE_LINE = re.compile(
    r"^  (?P<clock>\d\d:\d\d) T(?P<offset>[+-]\d\d)  views (?P<views>[\d,]+)  clicks (?P<clicks>[\d,]+)  "
    r"live (?P<live>[\d,]+)  cart [\d,]+  orders (?P<orders>[\d,]+)  paid (?P<paid>[\d,]+)  "
    r"GMV ¥(?P<gmv>[\d,.]+)  stock (?P<stock>[\d,]+)  CTR [\d.]+  CVR [\d.]+%  \| "
    r"live pack (?P<pack>[\d,]+)  \(this minute's clickers in it: (?P<members>[\d,]+)/(?P<clickers>[\d,]+)\)$"
)


def _int(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.mark.timeout(120)
def test_flashcrowd_demo_tells_the_whole_story(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASHCROWD_", "OTEL_"))}
    env.update(COLUMNS="100", PYTHONUNBUFFERED="1")
    workdir = tmp_path / "demo"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "demo", "--workdir", str(workdir), "--users", "30000"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    elapsed = time.monotonic() - started
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-4000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]

    # Every step's header, in order.
    titles = ["1. A world of behaviour", "2. Services", "3. Crowd packs", "4. Persona", "5. Ad serving",
              "6. Lookalike", "7. T-0, live", "8. After the sale", "Done"]  # fmt: skip
    positions = [out.find(t) for t in titles]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(
        zip(titles, positions, strict=True)
    )

    # 1-6: the batch story.
    assert "hook item sold out after" in out
    for pack in ("teaser-viewers", "sale-hour-clickers", "purchasers", "clickers-not-buyers"):
        assert pack in out
    assert "members of a population of" in out
    assert "packs/purchasers-lookalike-5:" in out and re.search(r"5%\s+│\s+[\d,]+\s+│\s+[\d.]+x", out)

    # 7: services wired as a user runs them, on the shared in-process bus.
    live = out[out.find("7. T-0, live") :]
    flat = " ".join(live.split())  # notes wrap at the console width
    assert "also serves EventService and LivePackService on memory://flashcrowd-demo" in flat
    assert re.search(r"sale monitor 127\.0\.0\.1:\d+ \(SaleMonitorService on memory://flashcrowd-demo", flat)
    assert "campaigns/t0-live-coupon: STATE_RUNNING" in flat

    # One line per simulated minute, T-05 .. T+29, counters from GetSaleStats.
    rows = [m.groupdict() for m in map(MINUTE_LINE.match, live.splitlines()) if m]
    assert [int(r["offset"]) for r in rows] == list(range(-5, 30)), [r["offset"] for r in rows]
    assert rows[0]["clock"] == "09:55" and rows[-1]["clock"] == "10:29"
    for key in ("views", "clicks", "live", "orders", "paid"):
        series = [_int(r[key]) for r in rows]
        assert series == sorted(series), (key, series)  # cumulative since T-5
    assert _int(rows[-1]["clicks"]) > 10_000 and _int(rows[-1]["paid"]) >= 500
    stock = [_int(r["stock"]) for r in rows]
    assert stock[0] == 500 and stock[-1] == 0 and stock == sorted(stock, reverse=True)
    # The live pack grows from nothing as the sale starts, and checks find this minute's clickers in it.
    sizes = [_int(r["pack"]) for r in rows]
    assert sizes[0] < 10 and max(sizes) > 300 and sizes[5] > 20 * max(1, sizes[4])
    assert all(0 < _int(r["members"]) <= _int(r["clickers"]) for r in rows[5:])

    # The STOP rule fires in the minute the 500 pieces are gone, pauses the push, and is audited.
    sold_out = next(r for r in rows if _int(r["stock"]) == 0)
    fired = re.search(r">> (\d\d:\d\d T[+-]\d\d)  STOP rule sold-out fired: stock_left=0 -> "
                      r"tenants/demo-shop/campaigns/t0-live-coupon STATE_PAUSED", live)  # fmt: skip
    assert fired, live[:6000]
    assert fired.group(1) == f"{sold_out['clock']} T{sold_out['offset']}"
    assert "rules/firings/demo-shop/t0-live-coupon/" in flat
    assert "sold-out (ACTION_STOP)" in flat and "paused: stock_left=0" in flat
    audit = list((workdir / "store" / "rules" / "firings" / "demo-shop" / "t0-live-coupon").glob("*.json"))
    assert len(audit) == 1

    # Snapshot of the live pack, retargeted.
    snap = re.search(
        r"SnapshotLivePack -> tenants/demo-shop/packs/warm-clickers-t30 v1: ([\d,]+) members", flat
    )
    assert snap and _int(snap.group(1)) > 100
    assert "WatchSale (first update)" in flat and "classic cotton" in flat
    done = re.search(r"warm-clickers-t30\s+│\s+STATE_COMPLETED\s+│\s+([\d,]+)\s+│\s+([\d,]+)", live)
    assert done, live[-3000:]
    assert _int(done.group(1)) + _int(done.group(2)) == _int(snap.group(1))
    assert re.search(r"replayed [\d,]+ events accepted \(0 duplicates, 0 rejected\)", flat)

    # 8: the after-sale test on the batch pack.
    after = " ".join(out[out.find("8. After the sale") :].split())
    assert "campaigns/after-sale-jacket" in after and "funnel and ROI per arm" in after

    assert elapsed < 90, f"the demo took {elapsed:.0f} s"
