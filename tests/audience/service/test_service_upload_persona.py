"""UploadPack, GetPackPersona and tenant isolation over real gRPC, on both stores."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as api
from flashcrowd.audience.v1 import pack_pb2
from pyroaring import BitMap

from services.audience.uploads import RAW_PII_REASON, hash_at_edge, upload_requests
from services.events.generator import synthetic_identities
from services.events.identity import IdType, hash_identifier
from services.runtime import error_details
from tests.audience.conftest import WORLD
from tests.audience.service.conftest import PERSONA_MIN, UPLOAD_MAX_ROWS
from tests.audience.service.specs import ET, INCLUDE_BOTS, behavior, ref
from tests.fixtures.channels import AS_TENANT

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _known(id_type: IdType, users: range) -> dict[int, str]:
    """user id -> raw identifier of that type, for simulated users that have one."""
    return {u: raw for u, kind, raw in synthetic_identities(list(users), WORLD.seed) if kind == id_type}


async def _stream(messages):
    for message in messages:
        yield message


def _header(tenant: str, pack_id: str, **kwargs) -> api.UploadPackHeader:
    values = dict(
        parent=f"tenants/{tenant}", pack_id=pack_id, id_type=api.ID_TYPE_PHONE, hash_type=api.HASH_TYPE_SHA256
    )
    values.update(kwargs)
    return api.UploadPackHeader(**values)


async def test_upload_matches_known_users_and_reports_bad_rows(svc) -> None:
    tenant = svc.new_tenant()
    phones = _known(IdType.PHONE, range(1, 601))
    known = sorted(phones)[:400]
    rows = [hash_identifier("phone", phones[u])[0] for u in known]
    rows += [hashlib.sha256(f"nobody-{i}".encode()).hexdigest() for i in range(100)]  # unknown people
    rows += rows[20:40]  # duplicates (none of them a bad row)
    rows[5] = rows[5].upper()  # upper-case hex is fine (and still matches)
    bad = {
        3: ("+86 138 0013 8000", RAW_PII_REASON),
        50: ("13800138000", RAW_PII_REASON),
        77: ("zz" * 32, "not a hex"),
        90: ("abc123", "wrong length"),
        91: (hashlib.md5(b"x").hexdigest(), "wrong length"),
        92: ("lily.wang@qq.com", RAW_PII_REASON),
    }
    bad_users = set()
    for index, (value, _) in bad.items():
        bad_users.add(known[index] if index < len(known) else None)
        rows[index] = value
    response = await svc.stub.UploadPack(
        _stream(upload_requests(_header(tenant, "uploaded", labels={"src": "crm"}), rows, chunk_rows=97))
    )
    stats = response.stats
    assert stats.received == len(rows) and stats.invalid == len(bad)
    assert stats.valid == len(rows) - len(bad) and stats.duplicates == 20
    matched_users = set(known) - bad_users
    assert stats.matched == len(matched_users)
    assert stats.match_rate == pytest.approx(len(matched_users) / (len(matched_users) + 100))
    assert [(r.index, r.reason) for r in response.invalid_rows][: len(bad)] == [
        (i, r.reason) for i, r in zip(sorted(bad), response.invalid_rows, strict=True)
    ]
    for row in response.invalid_rows:
        assert bad[row.index][1] in row.reason
        assert bad[row.index][0] not in row.reason  # never echoes the raw value

    pack = response.pack
    assert pack.name == f"tenants/{tenant}/packs/uploaded" and pack.source == pack_pb2.Pack.SOURCE_UPLOAD
    assert pack.size == len(matched_users) and pack.upload_stats == stats and pack.labels["src"] == "crm"
    members = svc.app.packs.load_bitmap(tenant, "uploaded")[0]
    assert members == BitMap(matched_users)
    stored = b"".join(svc.store.get_bytes(info.key) for info in svc.store.list(f"packs/{tenant}/"))
    assert b"13800138000" not in stored and b"lily.wang" not in stored  # raw PII never written

    # Uploads cannot be refreshed.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.stub.RefreshPack(api.RefreshPackRequest(name=pack.name))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(caught.value).reason == "PACK_NOT_REFRESHABLE"


async def test_upload_md5_and_edge_hashed_raw_values(svc) -> None:
    tenant = svc.new_tenant()
    emails = _known(IdType.EMAIL, range(1, 2001))
    md5_rows = [hash_identifier("email", raw)[1] for raw in emails.values()]
    response = await svc.stub.UploadPack(
        _stream(
            upload_requests(
                _header(tenant, "md5s", id_type=api.ID_TYPE_EMAIL, hash_type=api.HASH_TYPE_MD5), md5_rows
            )
        )
    )
    assert response.stats.matched == len(emails) and response.stats.match_rate == 1.0
    assert response.pack.size == len(emails)

    # The CLI path: raw values normalised and hashed at the edge; only digests are sent.
    oaids = _known(IdType.OAID, range(1, 1001))
    edge = hash_at_edge("oaid", [*oaids.values(), "not an oaid!"])
    assert edge.invalid_rows and edge.invalid_rows[0][0] == len(oaids)
    response = await svc.stub.UploadPack(
        _stream(upload_requests(_header(tenant, "oaids", id_type=api.ID_TYPE_OAID), edge.hashes))
    )
    assert response.stats.matched == len(oaids) and response.stats.invalid == 0
    assert svc.app.packs.load_bitmap(tenant, "oaids")[0] == BitMap(oaids)


async def test_bad_uploads_are_refused_and_write_nothing(svc) -> None:
    tenant = svc.new_tenant()
    digest = hashlib.sha256(b"x").hexdigest()
    chunk = api.UploadPackRequest(chunk=api.UploadPackChunk(hashed_ids=[digest]))
    header = api.UploadPackRequest(header=_header(tenant, "bad"))
    cases = {
        "missing header": ([chunk], "header", "UPLOAD_HEADER_MISSING"),
        "repeated header": ([header, chunk, header], "header", "UPLOAD_HEADER_REPEATED"),
        "no header at all": ([], "header", "UPLOAD_HEADER_MISSING"),
        "no rows": ([header], "chunk.hashed_ids", "UPLOAD_EMPTY"),
        "oversized": (
            [header, *[api.UploadPackRequest(chunk=api.UploadPackChunk(hashed_ids=[digest] * 1000))] * 4],
            "chunk.hashed_ids",
            "UPLOAD_TOO_LARGE",
        ),
        "bad id type": (
            [api.UploadPackRequest(header=_header(tenant, "bad", id_type=0)), chunk],
            "header.id_type",
            "INVALID_UPLOAD_HEADER",
        ),
        "bad hash type": (
            [api.UploadPackRequest(header=_header(tenant, "bad", hash_type=7)), chunk],
            "header.hash_type",
            "INVALID_UPLOAD_HEADER",
        ),
        "bad parent": (
            [api.UploadPackRequest(header=_header(tenant, "bad", parent="acme")), chunk],
            "header.parent",
            "INVALID_UPLOAD_HEADER",
        ),
        "bad pack id": (
            [api.UploadPackRequest(header=_header(tenant, "Bad_Id")), chunk],
            "header.pack_id",
            "INVALID_UPLOAD_HEADER",
        ),
    }
    assert UPLOAD_MAX_ROWS < 4000
    for label, (messages, field, reason) in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await svc.stub.UploadPack(_stream(messages))
        details = error_details(caught.value)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, label
        assert field in [f for f, _ in details.field_violations], (label, details.field_violations)
        assert details.reason == reason, label
    assert not list(svc.store.list(f"packs/{tenant}/"))

    # An existing pack id is ALREADY_EXISTS before any row is read.
    await svc.stub.UploadPack(_stream([header, chunk]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.stub.UploadPack(_stream([header, chunk]))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_persona_and_privacy_minimum(svc) -> None:
    tenant = svc.new_tenant()
    start, end = svc.dataset.start, svc.dataset.end
    big = await svc.create_pack(tenant, behavior([ET.EVENT_TYPE_PRODUCT_VIEW], start, end))
    assert big.size >= PERSONA_MIN
    persona = await svc.stub.GetPackPersona(api.GetPackPersonaRequest(name=big.name, top_n=3))
    assert persona.pack == big.name and persona.version == 1 and persona.size == big.size
    assert persona.population_size > persona.size
    assert persona.bots_excluded == big.build_stats.bots_excluded
    dims = {d.dimension: d for d in persona.dimensions}
    assert set(dims) == {"age_band", "gender", "region", "interest", "category"}
    assert all(len(d.buckets) <= 3 for d in dims.values())
    gender = dims["gender"].buckets[0]
    assert gender.tgi == pytest.approx(100 * gender.share / gender.population_share)

    phones = _known(IdType.PHONE, range(1, 60))
    small = await svc.stub.UploadPack(
        _stream(
            upload_requests(
                _header(tenant, "tiny"), [hash_identifier("phone", p)[0] for p in phones.values()]
            )
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.stub.GetPackPersona(api.GetPackPersonaRequest(name=small.pack.name))
    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.precondition_failure is not None and str(PERSONA_MIN) in details.message


async def test_tenant_isolation(svc) -> None:
    owner, intruder = svc.new_tenant(), svc.new_tenant()
    start, end = svc.dataset.start, svc.dataset.end
    pack = await svc.create_pack(owner, behavior([ET.EVENT_TYPE_CLICK], start, end), options=INCLUDE_BOTS)
    foreign = pack.name
    missing = f"tenants/{owner}/packs/never-existed"

    async def code_of(call) -> grpc.StatusCode:
        try:
            result = call()
            if hasattr(result, "__aiter__"):
                async for _ in result:
                    pass
            else:
                await result
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    # As the intruder, through the gateway (trusted header): the owner's pack is NOT_FOUND everywhere,
    # with the same answer as for a pack that does not exist.
    as_intruder = ((AS_TENANT, intruder),)
    for name in (foreign, missing):
        calls = [
            lambda n=name: svc.stub.GetPack(api.GetPackRequest(name=n), metadata=as_intruder),
            lambda n=name: svc.stub.DeletePack(api.DeletePackRequest(name=n), metadata=as_intruder),
            lambda n=name: svc.stub.RefreshPack(api.RefreshPackRequest(name=n), metadata=as_intruder),
            lambda n=name: svc.stub.GetPackPersona(api.GetPackPersonaRequest(name=n), metadata=as_intruder),
            lambda n=name: svc.stub.ListPacks(
                api.ListPacksRequest(parent=f"tenants/{owner}"), metadata=as_intruder
            ),
        ]
        for call in calls:
            assert await code_of(call) == grpc.StatusCode.NOT_FOUND
        # Member-level reads are refused to every tenant, its own packs included.
        export = lambda n=name: svc.stub.ExportPack(  # noqa: E731
            api.ExportPackRequest(name=n, format=api.EXPORT_FORMAT_USER_ID), metadata=as_intruder
        )
        assert await code_of(export) == grpc.StatusCode.PERMISSION_DENIED
    # Naming their own tenant, the intruder still cannot check, reference or export the owner's pack.
    own_parent = f"tenants/{intruder}"
    check = lambda: svc.stub.CheckMembership(  # noqa: E731
        api.CheckMembershipRequest(parent=own_parent, packs=[foreign], user_ids=[1]), metadata=as_intruder
    )
    assert await code_of(check) == grpc.StatusCode.PERMISSION_DENIED
    calls = [
        lambda: svc.stub.CreatePack(
            api.CreatePackRequest(parent=own_parent, pack_id="steal", pack=pack_pb2.Pack(spec=ref(foreign))),
            metadata=as_intruder,
        ),
        lambda: svc.stub.EstimatePackSize(
            api.EstimatePackSizeRequest(parent=own_parent, spec=ref(foreign)), metadata=as_intruder
        ),
        lambda: svc.stub.CheckMembership(
            api.CheckMembershipRequest(parent=own_parent, packs=[foreign], user_ids=[1])
        ),
    ]
    for call in calls:
        assert await code_of(call) == grpc.StatusCode.NOT_FOUND
    listed = await svc.stub.ListPacks(api.ListPacksRequest(parent=own_parent), metadata=as_intruder)
    assert not listed.packs
    # Upload into someone else's tenant.
    digest = hashlib.sha256(b"x").hexdigest()
    upload = [
        api.UploadPackRequest(header=_header(owner, "planted")),
        api.UploadPackRequest(chunk=api.UploadPackChunk(hashed_ids=[digest])),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.stub.UploadPack(_stream(upload), metadata=as_intruder)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # The owner, through the gateway, still sees it.
    same = await svc.stub.GetPack(api.GetPackRequest(name=foreign), metadata=((AS_TENANT, owner),))
    assert same.name == foreign and same.size_disclosure == pack_pb2.SIZE_DISCLOSURE_NOISY


async def test_cli_upload_hashes_raw_values_at_the_edge(svc, tmp_path, capsys) -> None:
    import asyncio
    import json

    from services.cli.main import main

    tenant = svc.new_tenant()
    phones = _known(IdType.PHONE, range(1, 301))
    path = tmp_path / "crm.csv"
    rows = ["name,phone"] + [f"user {u},{raw}" for u, raw in phones.items()]
    rows.insert(4, "broken,call me maybe")  # data row 3 (0-based) cannot be normalised: reported, never sent
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    argv = [
        "pack", "upload", str(path), "--tenant", tenant, "--pack-id", "crm", "--id-type", "phone",
        "--raw", "--column", "phone", "--server", f"127.0.0.1:{svc.port}", "--label", "src=crm", "--json",
    ]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert int(out["stats"]["received"]) == len(phones) and int(out["stats"]["matched"]) == len(phones)
    assert out["invalidBeforeSending"][0]["row"] == 3
    assert out["pack"]["labels"] == {"src": "crm"}
    assert svc.app.packs.load_bitmap(tenant, "crm")[0] == BitMap(phones)
    stored = b"".join(svc.store.get_bytes(info.key) for info in svc.store.list(f"packs/{tenant}/"))
    assert not any(raw.encode() in stored for raw in list(phones.values())[:20])

    # Without --raw, raw values are sent as they are and the server refuses them row by row.
    plain = [a if a != "crm" else "crm2" for a in argv if a != "--raw"]
    assert await asyncio.to_thread(main, plain) == 0
    out = json.loads(capsys.readouterr().out)
    assert int(out["stats"]["invalid"]) == len(phones) + 1 and int(out["pack"].get("size", 0)) == 0
    assert {r["reason"] for r in out["invalidRows"]} >= {RAW_PII_REASON}
