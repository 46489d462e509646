"""No plain digest of a platform identifier is written anywhere; uploads match raw, SHA-256 and MD5 alike.

A fresh small world (keyed under a test pepper) on each store kind, a real audience server on port 0,
and real uploads of known phone numbers and e-mail addresses: raw through the CLI (normalised and
SHA-256-hashed at the edge), and as SHA-256 and MD5 digests (upper- and lower-case hex) through
UploadPack, plus people the platform does not know and a few bad rows. Then packs are built over
the uploads, exported (user ids and keyed hashes), and *everything* written or said is searched
for the unkeyed SHA-256 and MD5 of every uploaded identifier, in hex (either case) and as raw
bytes, and for the identifiers themselves:

* every object in the store: Parquet files cell by cell (polars; every string and binary value,
  nested lists included) and all objects as raw bytes;
* the captured logs (every logger, DEBUG), the CLI's output, every RPC response, and the
  OpenTelemetry spans (names, attributes, events) of the run.

The retarget ledger is not involved here: it stores user ids and coupons, never identifiers.
``test_scanner_finds_planted_digests`` proves the search itself would see each form.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import logging
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
import numpy as np
import polars as pl
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as api
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pyroaring import BitMap

from services.audience.uploads import check_identity_pepper, key_upload, match_rows, upload_requests
from services.cli.main import main as flashcrowd
from services.events.dataset import EventDataset
from services.events.generator import GenConfig, generate, synthetic_identities
from services.events.identity import IdType, key_identifier, normalise
from services.events.pepper import Pepper
from services.runtime import FailedPrecondition, error_details, setup_telemetry
from services.storage import LocalObjectStore, MinioObjectStore, ObjectStore
from tests.audience.service.conftest import Service, start_service, stop_service
from tests.audience.service.specs import ET, INCLUDE_BOTS, behavior, exclude, intersect, ref
from tests.fixtures.s3server import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, s3_url, unique_bucket

SCAN_WORLD = GenConfig(users=3000, days=2, seed=23)
PHONE_USERS = range(1, 401)
EMAIL_USERS = range(1, 1201)
#: People the platform does not know: their digests must not be written either.
UNKNOWN_PHONES = [f"+1 415 555 {i:04d}" for i in range(60)]
UNKNOWN_EMAILS = [f"stranger{i}@example.org" for i in range(60)]


# --- the search ---------------------------------------------------------------------------------


class Needles:
    """Forms of identifiers that must never appear: plain digests (hex, raw) and the values."""

    def __init__(self, normalised: Iterable[str], raw_values: Iterable[str]) -> None:
        values = sorted(set(normalised))
        self.hex: dict[int, set[str]] = {32: set(), 64: set()}
        self.raw: dict[int, set[bytes]] = {16: set(), 32: set()}
        for value in values:
            data = value.encode()
            for digest in (hashlib.sha256(data).digest(), hashlib.md5(data, usedforsecurity=False).digest()):
                self.hex[2 * len(digest)].add(digest.hex())
                self.raw[len(digest)].add(digest)
        # Identifiers in clear: mobile numbers (11 digits, with or without 86) and e-mail addresses.
        self.mobiles = {v[-11:] for v in values if v.isdigit()}
        self.emails = {v for v in values if "@" in v} | {r.strip().lower() for r in raw_values if "@" in r}
        self._prefixes = np.array(
            sorted({int.from_bytes(d[:8], "little") for group in self.raw.values() for d in group}),
            dtype=np.uint64,
        )

    def in_text(self, text: str) -> list[str]:
        """Hex digests (either case) anywhere in ``text``, and identifiers in clear."""
        found: list[str] = []
        for run in re.findall(r"[0-9A-Fa-f]{32,}", text):
            low = run.lower()
            for width, group in self.hex.items():
                found += [
                    low[i : i + width] for i in range(len(low) - width + 1) if low[i : i + width] in group
                ]
        for run in re.findall(r"\d{11,}", text):
            found += [run[i : i + 11] for i in range(len(run) - 10) if run[i : i + 11] in self.mobiles]
        found += [e for e in re.findall(r"[^\s@\"',;:<>()\[\]{}]+@[^\s@\"',;:<>()\[\]{}]+", text.lower())
                  if e in self.emails]  # fmt: skip
        return found

    def in_bytes(self, data: bytes) -> list[str]:
        """Raw 16/32-byte digests at any offset, plus ``in_text`` of the bytes read as latin-1."""
        found = self.in_text(data.decode("latin-1"))
        if len(data) >= 16:
            arr = np.frombuffer(data, dtype=np.uint8)
            keys = np.lib.stride_tricks.sliding_window_view(arr, 8).copy().view("<u8").ravel()
            for offset in np.flatnonzero(np.isin(keys, self._prefixes)).tolist():
                for width, group in self.raw.items():
                    if data[offset : offset + width] in group:
                        found.append(f"raw {width}-byte digest at offset {offset}")
        return found

    def in_parquet(self, data: bytes) -> list[str]:
        """Every string and binary cell (lists exploded) of a Parquet file."""
        frame = pl.read_parquet(io.BytesIO(data))
        found: list[str] = []
        for name in frame.columns:
            column = frame.get_column(name)
            while isinstance(column.dtype, pl.List | pl.Array):
                column = column.explode()
            if column.dtype == pl.Utf8 or column.dtype == pl.Categorical:
                cells = column.cast(pl.Utf8).drop_nulls().to_list()
                found += [f"{name}: {hit}" for hit in self.in_text("\n".join(cells))]
                found += [f"{name}: {hit}" for hit in self.in_bytes("\n".join(cells).encode())]
            elif column.dtype == pl.Binary:
                for cell in column.drop_nulls().to_list():
                    found += [f"{name}: {hit}" for hit in self.in_bytes(cell)]
        return found


def store_objects(store: ObjectStore, root: Path | None) -> Iterator[tuple[str, bytes]]:
    """Every object of the store; for a local store every file under its root (temp files too)."""
    if root is not None:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                yield str(path.relative_to(root)), path.read_bytes()
        return
    for info in store.list(""):
        yield info.key, store.get_bytes(info.key)


def scan_store(needles: Needles, store: ObjectStore, root: Path | None) -> tuple[int, int, dict[str, list]]:
    """(objects, parquet files, {key: hits}) over the whole store; the identity map must be among them."""
    hits: dict[str, list] = {}
    objects = parquet = 0
    identity_rows = 0
    for key, data in store_objects(store, root):
        objects += 1
        found = needles.in_bytes(data)
        if data[:4] == b"PAR1":
            parquet += 1
            found += needles.in_parquet(data)
            if "/identity/" in f"/{key}":
                identity_rows += pl.read_parquet(io.BytesIO(data)).height
        if found:
            hits[key] = found[:5]
    assert identity_rows > 0, "the identity map was not among the scanned objects"
    return objects, parquet, hits


def spans_text(exporter: InMemorySpanExporter) -> str:
    lines = []
    for span in exporter.get_finished_spans():
        lines.append(span.name)
        lines += [f"{k}={v}" for k, v in (span.attributes or {}).items()]
        for event in span.events:
            lines.append(event.name)
            lines += [f"{k}={v}" for k, v in (event.attributes or {}).items()]
        lines.append(str(span.status.description or ""))
    return "\n".join(lines)


# --- the world, the people, the server ----------------------------------------------------------


def known(id_type: IdType, users: range) -> dict[int, str]:
    return {u: raw for u, kind, raw in synthetic_identities(list(users), SCAN_WORLD.seed) if kind == id_type}


def digests(id_type: IdType, raws: Iterable[str], algo: str, *, upper_every: int = 0) -> list[str]:
    out = []
    for i, raw in enumerate(raws):
        value = hashlib.new(algo, normalise(id_type, raw).encode()).hexdigest()
        out.append(value.upper() if upper_every and i % upper_every == 0 else value)
    return out


def make_store(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[ObjectStore, str, Path | None]:
    if kind == "local":
        root = tmp_path / "store"
        return LocalObjectStore(root), root.as_uri(), root
    endpoint = request.getfixturevalue("s3_server")
    bucket = unique_bucket("scan")
    store = MinioObjectStore(endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, bucket, secure=False, region=S3_REGION)
    return store, s3_url(endpoint, bucket), None


async def _stream(messages):
    for message in messages:
        yield message


def _header(tenant: str, pack_id: str, id_type: int, hash_type: int) -> api.UploadPackHeader:
    return api.UploadPackHeader(
        parent=f"tenants/{tenant}", pack_id=pack_id, id_type=id_type, hash_type=hash_type
    )


async def upload(svc: Service, tenant: str, pack_id: str, id_type: int, hash_type: int, rows: list[str]):
    return await svc.stub.UploadPack(
        _stream(upload_requests(_header(tenant, pack_id, id_type, hash_type), rows, chunk_rows=150))
    )


def cli_upload(path: Path, svc: Service, tenant: str, pack_id: str, id_type: str) -> int:
    argv = ["pack", "upload", str(path), "--tenant", tenant, "--pack-id", pack_id, "--id-type", id_type]
    return flashcrowd([*argv, "--raw", "--server", f"127.0.0.1:{svc.port}", "--json"])


def write_csv(path: Path, column: str, values: Iterable[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([column])
        writer.writerows([v] for v in values)
    return path


async def members(svc: Service, tenant: str, pack_id: str) -> BitMap:
    return (await asyncio.to_thread(svc.app.packs.load_bitmap, tenant, pack_id))[0]


async def export(svc: Service, name: str, fmt: int) -> list:
    out: list = []
    async for page in svc.stub.ExportPack(api.ExportPackRequest(name=name, format=fmt, page_size=97)):
        out += list(page.user_ids) if fmt == api.EXPORT_FORMAT_USER_ID else list(page.hashed_ids)
    return out


@pytest.mark.parametrize("kind", ["local", "s3"])
async def test_nothing_written_or_logged_holds_a_plain_digest(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    exporter = InMemorySpanExporter()
    setup_telemetry("identifier-scan", span_exporter=exporter)
    pepper = Pepper(secrets.token_bytes(32))
    store, url, root = make_store(kind, tmp_path, request)
    await asyncio.to_thread(generate, store, SCAN_WORLD, pepper=pepper)
    svc = await start_service(kind, store, url, identity_pepper=pepper.key.hex())
    phones, emails = known(IdType.PHONE, PHONE_USERS), known(IdType.EMAIL, EMAIL_USERS)
    all_phones = [*phones.values(), *UNKNOWN_PHONES]
    all_emails = [*emails.values(), *UNKNOWN_EMAILS]
    needles = Needles(
        [normalise(IdType.PHONE, p) for p in all_phones] + [normalise(IdType.EMAIL, e) for e in all_emails],
        [*all_phones, *all_emails],
    )
    assert len(needles.hex[64]) == len(all_phones) + len(all_emails)
    said: list[str] = []  # every response and CLI output, searched like the logs
    tenant = svc.new_tenant()
    try:
        # Raw values through the CLI (hashed at the edge), with a row that cannot be normalised.
        phone_file = write_csv(tmp_path / "phones.csv", "phone", [*all_phones, "call me maybe"])
        email_file = write_csv(tmp_path / "emails.csv", "email", [*all_emails, "not-an-address"])
        for path, pack_id, id_type in (
            (phone_file, "raw-phones", "phone"),
            (email_file, "raw-emails", "email"),
        ):
            assert await asyncio.to_thread(cli_upload, path, svc, tenant, pack_id, id_type) == 0
        printed = capsys.readouterr()
        said += [printed.out, printed.err]
        assert '"invalidBeforeSending"' in printed.out and '"row": ' in printed.out

        # Digests over gRPC: SHA-256 and MD5, some upper-case, plus raw PII in a hashed upload.
        phone, email, sha, md5 = api.ID_TYPE_PHONE, api.ID_TYPE_EMAIL, api.HASH_TYPE_SHA256, api.HASH_TYPE_MD5
        uploads = {
            "sha-phones": (phone, sha, digests(IdType.PHONE, all_phones, "sha256", upper_every=3)),
            "md5-phones": (phone, md5, digests(IdType.PHONE, all_phones, "md5", upper_every=4)),
            "sha-emails": (email, sha, digests(IdType.EMAIL, all_emails, "sha256")),
            "md5-emails": (email, md5, digests(IdType.EMAIL, all_emails, "md5", upper_every=2)),
        }
        uploads["sha-phones"][2][7] = all_phones[7]  # raw PII where a digest belongs: refused row 7
        uploads["md5-emails"][2][3] = all_emails[3]
        responses = {}
        for pack_id, (id_type, hash_type, rows) in uploads.items():
            responses[pack_id] = await upload(svc, tenant, pack_id, id_type, hash_type, rows)
            said.append(str(responses[pack_id]))
        assert [r.index for r in responses["sha-phones"].invalid_rows] == [7]
        assert [r.index for r in responses["md5-emails"].invalid_rows] == [3]

        # Raw, SHA-256 and MD5 uploads of the same people meet the same users.
        phone_users = BitMap(phones) - BitMap([list(phones)[7]])
        email_users = BitMap(emails) - BitMap([list(emails)[3]])
        assert await members(svc, tenant, "raw-phones") == BitMap(phones)
        assert await members(svc, tenant, "md5-phones") == BitMap(phones)
        assert await members(svc, tenant, "sha-phones") == phone_users
        assert (
            await members(svc, tenant, "raw-emails")
            == await members(svc, tenant, "sha-emails")
            == BitMap(emails)
        )
        assert await members(svc, tenant, "md5-emails") == email_users
        assert responses["md5-phones"].stats.matched == len(phones)
        assert responses["md5-phones"].stats.match_rate == pytest.approx(len(phones) / len(all_phones))

        # Packs built over the uploads, then exports of user ids and keyed hashes.
        start, end = svc.dataset.start, svc.dataset.end
        clickers = behavior([ET.EVENT_TYPE_CLICK], start, end)
        name = f"tenants/{tenant}/packs/"
        built = [
            await svc.create_pack(
                tenant, intersect(ref(name + "raw-phones"), clickers), options=INCLUDE_BOTS
            ),
            await svc.create_pack(tenant, exclude(ref(name + "sha-emails"), ref(name + "md5-phones"))),
        ]
        said += [str(p) for p in built]
        assert built[0].size > 0
        for pack in [*built, (await svc.stub.GetPack(api.GetPackRequest(name=name + "raw-phones")))]:
            ids = await export(svc, pack.name, api.EXPORT_FORMAT_USER_ID)
            keyed = await export(svc, pack.name, api.EXPORT_FORMAT_KEYED_SHA256_PHONE)
            said += [
                str(ids),
                str(keyed),
                str(await export(svc, pack.name, api.EXPORT_FORMAT_KEYED_SHA256_OAID)),
            ]
            assert len(ids) == pack.size
        keyed = await export(svc, name + "raw-phones", api.EXPORT_FORMAT_KEYED_SHA256_PHONE)
        assert sorted(keyed) == sorted(key_identifier(pepper, IdType.PHONE, p)[0] for p in phones.values())
        said.append(str(await svc.stub.ListPacks(api.ListPacksRequest(parent=f"tenants/{tenant}"))))
        for fmt in (
            api.EXPORT_FORMAT_SHA256_PHONE,
            api.EXPORT_FORMAT_MD5_PHONE,
            api.EXPORT_FORMAT_SHA256_OAID,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await export(svc, name + "raw-phones", fmt)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await stop_service(svc)

    # The search: the store, then everything said (responses, CLI output, logs, spans).
    try:
        objects, parquet, hits = await asyncio.to_thread(scan_store, needles, store, root)
    finally:
        if isinstance(store, MinioObjectStore):  # keep the in-memory S3 server small
            for info in store.client.list_objects(store.bucket, recursive=True):
                store.client.remove_object(store.bucket, info.object_name or "")
            store.client.remove_bucket(store.bucket)
    assert objects > 20 and parquet >= 4
    assert hits == {}, f"plain digests or identifiers written: {hits}"
    printed = capsys.readouterr()
    said += [printed.out, printed.err, caplog.text, spans_text(exporter)]
    assert "UploadPack" in said[-1] and caplog.records
    for text in said:
        assert needles.in_bytes(text.encode()) == []


async def test_another_pepper_matches_nothing(tmp_path: Path) -> None:
    pepper, other = Pepper(secrets.token_bytes(32)), Pepper(secrets.token_bytes(32))
    store = LocalObjectStore(tmp_path / "store")
    await asyncio.to_thread(generate, store, SCAN_WORLD, pepper=pepper)
    phones = known(IdType.PHONE, PHONE_USERS)
    rows = digests(IdType.PHONE, phones.values(), "sha256")
    identity = EventDataset(store).scan_identity()

    # Keyed under the writer's pepper every digest meets its user; under another, none does.
    assert match_rows(identity, api.ID_TYPE_PHONE, "key_sha256", key_upload(pepper, pl.Series(rows))) == (
        BitMap(phones),
        len(phones),
    )
    assert match_rows(identity, api.ID_TYPE_PHONE, "key_sha256", key_upload(other, pl.Series(rows))) == (
        BitMap(),
        0,
    )
    # The plain digests themselves match nothing either: the map holds none.
    assert match_rows(identity, api.ID_TYPE_PHONE, "key_sha256", pl.Series(rows)) == (BitMap(), 0)

    # A service with another pepper refuses loudly instead of answering a 0% match rate.
    right = await start_service(
        "local", store, (tmp_path / "store").as_uri(), identity_pepper=pepper.key.hex()
    )
    wrong = await start_service(
        "local", store, (tmp_path / "store").as_uri(), identity_pepper=other.key.hex()
    )
    try:
        tenant = right.new_tenant()
        good = await upload(right, tenant, "ok", api.ID_TYPE_PHONE, api.HASH_TYPE_SHA256, rows)
        assert good.stats.matched == len(phones)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await upload(wrong, tenant, "wrong-pepper", api.ID_TYPE_PHONE, api.HASH_TYPE_SHA256, rows)
        details = error_details(caught.value)
        assert (
            details.code == grpc.StatusCode.FAILED_PRECONDITION
            and details.reason == "IDENTITY_PEPPER_MISMATCH"
        )
        assert pepper.id in details.message and other.id in details.message
        assert pepper.key.hex() not in details.message and other.key.hex() not in details.message
        assert not wrong.app.packs.exists(tenant, "wrong-pepper")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await export(wrong, good.pack.name, api.EXPORT_FORMAT_KEYED_SHA256_PHONE)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert await export(wrong, good.pack.name, api.EXPORT_FORMAT_USER_ID) == sorted(phones)
    finally:
        await stop_service(right)
        await stop_service(wrong)


def test_identity_maps_with_plain_digests_are_refused() -> None:
    pepper = Pepper(b"p" * 32)
    old = pl.LazyFrame({"user_id": [1], "id_type": [1], "sha256": ["ab" * 32], "md5": ["cd" * 16]})
    with pytest.raises(FailedPrecondition, match="predates keyed identities"):
        check_identity_pepper(old, pepper)
    check_identity_pepper(
        pl.LazyFrame({"pepper_id": []}, schema={"pepper_id": pl.Utf8}), pepper
    )  # empty: fine
    check_identity_pepper(pl.LazyFrame({"pepper_id": [pepper.id] * 3}), pepper)


def test_scanner_finds_planted_digests(tmp_path: Path) -> None:
    """The search is not vacuous: each form of a digest, and the identifiers, are found."""
    phone, email = "8613800138000", "lily.wang@qq.com"
    needles = Needles([phone, email], [" Lily.Wang@QQ.com "])
    sha, md5 = hashlib.sha256(phone.encode()), hashlib.md5(email.encode())
    assert needles.in_text(f"x{sha.hexdigest().upper()}y") == [sha.hexdigest()]
    assert needles.in_text(f"id={md5.hexdigest()}") == [md5.hexdigest()]
    assert needles.in_text("call 138 0013 8000 or 13800138000") == ["13800138000"]
    assert needles.in_text('{"to": "LILY.WANG@qq.com"}') == [email]
    assert needles.in_bytes(b"\x00" * 5 + sha.digest() + b"\x01")[-1] == "raw 32-byte digest at offset 5"
    assert needles.in_bytes(b"abc" + md5.digest())[-1] == "raw 16-byte digest at offset 3"
    frame = pl.DataFrame(
        {
            "tags": [["a", sha.hexdigest()], []],
            "blob": [b"..." + md5.digest(), None],
            "n": [1, 2],
        }
    )
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd")
    data = buffer.getvalue()
    assert needles.in_parquet(data) and {h.split(":")[0] for h in needles.in_parquet(data)} == {
        "tags",
        "blob",
    }
    assert needles.in_text("no digests, just 0123456789abcdef0123456789abcdef0123") == []
