"""Launch throughput: coupons issued per second for a 1M-user audience.

    .venv/bin/python bench/launch.py [--users 1000000] [--database postgresql|sqlite]
        [--batch 5000] [--page 50000] [--holdout-bp 1000] [--cache-dir var/bench]

Everything is real and in separate processes: a generated world (reused from ``--cache-dir`` when
one with enough users exists, else generated once with ``flashcrowd gen``), ``python -m
services.audience`` serving it, an uploaded pack of exactly ``--users`` members (UploadPack of
their phone hashes), and ``python -m services.retarget`` on a throwaway PostgreSQL database (or a
SQLite file). A two-arm campaign (10 fen off / 15% off, ``--holdout-bp`` held out) is launched
and timed from LaunchCampaign to COMPLETED.

Figures: coupons issued/s and members processed/s, the retarget process's CPU, time to the first
offer in the outbox, then the launch invariants read back from the ledger (one member row per
audience member, one coupon and one outbox row per issued member, counters == rows).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import grpc.aio
import polars as pl
from audience_proc import AudienceProcess
from flashcrowd.audience.v1 import audience_service_pb2, audience_service_pb2_grpc
from flashcrowd.retarget.v1 import campaign_pb2, coupon_pb2, retarget_service_pb2, retarget_service_pb2_grpc
from retarget_proc import RetargetProcess, create_pg_database, drop_pg_database

from services.events.dataset import EventDataset
from services.events.generator import synthetic_identities
from services.events.identity import hash_identifier
from services.events.schema import IdType
from services.retarget import repository as repo
from services.retarget.db import Database
from services.storage import LocalObjectStore

api = retarget_service_pb2
ROOT = Path(__file__).resolve().parents[1]
TENANT = "bench"


def ensure_world(cache_dir: Path, users: int) -> Path:
    """A cached world with at least ``users`` users, else generate one (1 day) once."""
    candidates = []
    for path in cache_dir.glob("u*-d*-s*"):
        match = re.fullmatch(r"u(\d+)-d(\d+)-s(\d+)", path.name)
        manifest = path / "data" / "manifest.json"
        # "identity_keys": worlds from before keyed identities (plain digests) are not reused.
        if (
            match
            and int(match.group(1)) >= users
            and manifest.exists()
            and b"identity_keys" in manifest.read_bytes()
        ):
            candidates.append((int(match.group(1)), int(match.group(2)), path))
    if candidates:
        path = min(candidates)[2]
        print(f"world        {path} (cached)")
        return path
    path = cache_dir / f"u{users}-d1-s0"
    print(f"world        generating {users:,} users x 1 day into {path} (once) ...", flush=True)
    command = [sys.executable, "-m", "services.cli.main", "gen", "--users", str(users), "--days", "1",
               "--seed", "0", "--store", str(path), "--overwrite", "--no-progress"]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT)
    return path


def phone_hashes(store_dir: Path, users: int) -> list[str]:
    """SHA-256 of the first ``users`` phone owners' numbers, as an advertiser would upload them."""
    dataset = EventDataset(LocalObjectStore(store_dir))
    identity = (
        dataset.scan_identity(["user_id", "id_type"])
        .filter(pl.col("id_type") == int(IdType.PHONE))
        .sort("user_id")
        .head(users)
        .collect()
    )
    if identity.height < users:
        raise SystemExit(f"the world has only {identity.height} users with a phone hash")
    seed = int(dataset.manifest["generator"]["seed"])
    raws = synthetic_identities(identity["user_id"].to_numpy(), seed)
    return [hash_identifier(kind, raw)[0] for _user, kind, raw in raws if kind == IdType.PHONE]


async def upload(target: str, hashes: list[str]) -> tuple[str, int, float]:
    started = time.perf_counter()

    async def requests():
        yield audience_service_pb2.UploadPackRequest(
            header=audience_service_pb2.UploadPackHeader(
                parent=f"tenants/{TENANT}",
                pack_id="launch-audience",
                id_type=audience_service_pb2.ID_TYPE_PHONE,
                hash_type=audience_service_pb2.HASH_TYPE_SHA256,
            )
        )
        for start in range(0, len(hashes), 20_000):
            yield audience_service_pb2.UploadPackRequest(
                chunk=audience_service_pb2.UploadPackChunk(hashed_ids=hashes[start : start + 20_000])
            )

    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = audience_service_pb2_grpc.AudienceServiceStub(channel)
        response = await stub.UploadPack(requests(), timeout=600)
    return response.pack.name, response.pack.size, time.perf_counter() - started


async def launch(target: str, pack: str, holdout_bp: int) -> tuple[campaign_pb2.Campaign, float, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = retarget_service_pb2_grpc.RetargetServiceStub(channel)
        parent = f"tenants/{TENANT}"
        ten = await stub.CreateCouponTemplate(
            api.CreateCouponTemplateRequest(
                parent=parent,
                coupon_template_id="ten-off",
                coupon_template=coupon_pb2.CouponTemplate(
                    fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=10)
                ),
            )
        )
        pct = await stub.CreateCouponTemplate(
            api.CreateCouponTemplateRequest(
                parent=parent,
                coupon_template_id="fifteen-percent",
                coupon_template=coupon_pb2.CouponTemplate(
                    percent_off=coupon_pb2.PercentOff(basis_points=1500, cap_fen=3000)
                ),
            )
        )
        campaign = await stub.CreateCampaign(
            api.CreateCampaignRequest(
                parent=parent,
                campaign_id="after-sale",
                campaign=campaign_pb2.Campaign(
                    audience_pack=pack,
                    coupon_template=ten.name,
                    arms=[
                        campaign_pb2.Arm(arm_id="ten", weight=1),
                        campaign_pb2.Arm(arm_id="pct", weight=1, coupon_template=pct.name),
                    ],
                    holdout_basis_points=holdout_bp,
                    offer_item_ids=[1001],
                ),
            )
        )
        started = time.perf_counter()
        await stub.LaunchCampaign(api.LaunchCampaignRequest(name=campaign.name))
        first_offer = float("nan")
        while True:
            current = await stub.GetCampaign(api.GetCampaignRequest(name=campaign.name))
            if first_offer != first_offer and current.progress.issued:  # nan until set
                first_offer = time.perf_counter() - started
            if current.state != campaign_pb2.Campaign.STATE_RUNNING:
                return current, time.perf_counter() - started, first_offer
            await asyncio.sleep(0.1)


def launch_invariants(url: str) -> dict[str, Any]:
    database = Database.open(url, pool_min=1, pool_max=1)
    try:

        def read(tx):
            return {
                "members": tx.scalar("SELECT COUNT(*) FROM campaign_members"),
                "coupons": tx.scalar("SELECT COUNT(*) FROM coupons"),
                "outbox": tx.scalar("SELECT COUNT(*) FROM outbox"),
                "checks": repo.ledger_invariants(tx),
            }

        return database.call(read, write=False)
    finally:
        database.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--page", type=int, default=50_000)
    parser.add_argument("--holdout-bp", type=int, default=1000)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "var" / "bench")
    args = parser.parse_args()

    store_dir = ensure_world(args.cache_dir, args.users)
    hashes = phone_hashes(store_dir, args.users)
    workdir = Path(tempfile.mkdtemp(prefix="retarget-launch-"))
    url = create_pg_database() if args.database == "postgresql" else f"sqlite:///{workdir / 'retarget.db'}"
    # The audience process writes its pack under a prefix of this run only (removed at the end),
    # never next to a cached world's own packs; its operations go to a control database of this run.
    run_prefix = f"bench-retarget-{uuid.uuid4().hex[:8]}/"
    try:
        with AudienceProcess(
            str(store_dir),
            upload_max_rows=max(args.users, 1),
            max_message_bytes=64 << 20,
            packs_prefix=f"{run_prefix}packs/",
            control_database_url=f"sqlite:///{workdir / 'audience-control.sqlite3'}",
        ) as aud:
            pack, size, upload_seconds = await upload(aud.target, hashes)
            print(f"audience     {pack}: {size:,} members (uploaded in {upload_seconds:.1f} s)")
            with RetargetProcess(
                url,
                audience_target=aud.target,
                launch_batch_size=args.batch,
                launch_page_size=args.page,
                audience_timeout_seconds=120,
            ) as server:
                cpu0 = server.cpu_seconds()
                finished, seconds, first_offer = await launch(server.target, pack, args.holdout_bp)
                cpu = server.cpu_seconds() - cpu0
        progress = finished.progress
        print(f"launch       {args.database}, batch {args.batch}, page {args.page}: "
              f"{campaign_pb2.Campaign.State.Name(finished.state)} in {seconds:.1f} s")  # fmt: skip
        print(f"  coupons issued/s     {progress.issued / seconds:10.0f}   ({progress.issued:,} coupons)")
        print(f"  members processed/s  {progress.processed / seconds:10.0f}  "
            f" ({progress.processed:,} members,"
              f" {progress.held_out:,} held out)")  # fmt: skip
        print(f"  first offer after    {first_offer:10.2f} s")
        print(f"  retarget CPU         {cpu:10.1f} s   ({cpu / seconds:.2f} cores)")
        stored = launch_invariants(url)
        bad = {k: v for k, v in stored["checks"].items() if v}
        print(f"invariants   members {stored['members']:,}  coupons {stored['coupons']:,}  outbox"
            f" {stored['outbox']:,}"
              f"  ledger checks {bad or 'all zero'}")  # fmt: skip
        assert stored["members"] == progress.processed == size
        assert stored["coupons"] == stored["outbox"] == progress.issued
    finally:
        shutil.rmtree(store_dir / run_prefix, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        if args.database == "postgresql":
            drop_pg_database(url)


if __name__ == "__main__":
    asyncio.run(main())
