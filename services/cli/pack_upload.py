"""``flashcrowd pack upload``: send identifiers to UploadPack; with ``--raw``, hash them here first.

    flashcrowd pack upload phones.csv --tenant T --pack-id P --id-type phone --raw [--column phone]
    flashcrowd pack upload digests.txt --tenant T --pack-id P --id-type oaid --hash sha256

The file is CSV with a header (``--column`` names the identifier column; default: the first) or plain
text with one identifier per line (``.txt``). With ``--raw`` every value is normalised for its type
(phone to digits with country code, e-mail trimmed and lower-cased, device ids lower-cased) and
SHA-256-hashed in this process: only digests are sent, and rows that cannot be normalised are
reported here by line, never sent. Without ``--raw`` the values must already be hex digests; the
server rejects anything that looks like raw PII row by row. The service keys every digest with the
platform pepper (HMAC-SHA-256, ``services.events.identity``) before matching and stores none of
them; this command does not hold the pepper (it is a platform secret, and advertisers run this).

The call goes to ``--server`` (default ``$FLASHCROWD_AUDIENCE_TARGET`` or 127.0.0.1:50051): the
audience service directly, or the gateway with ``--api-key`` (sent as ``x-api-key``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.cli.common import CliError
from services.runtime.assertion import AssertionSigner, Caller, load_assertion_key

TARGET_ENV = "FLASHCROWD_AUDIENCE_TARGET"
DEFAULT_TARGET = "127.0.0.1:50051"
ID_TYPES = ("phone", "oaid", "imei", "idfa", "email")
CHUNK_ROWS = 50_000


def add_upload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="CSV with a header, or .txt with one identifier per line")
    parser.add_argument("--tenant", required=True, help="tenant id")
    parser.add_argument(
        "--pack-id", required=True, help="new pack id (1-63 of [a-z0-9-], starting with a letter)"
    )
    parser.add_argument("--id-type", required=True, choices=ID_TYPES, help="identifier type of every row")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--raw", action="store_true", help="values are raw: normalise and SHA-256 them here")
    form.add_argument(
        "--hash", choices=("sha256", "md5"), default="sha256", help="digest of pre-hashed values"
    )
    parser.add_argument(
        "--column", default=None, help="CSV column holding the identifiers (default: the first)"
    )
    parser.add_argument("--display-name", default="", help="human-readable pack name")
    parser.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="label (repeatable)"
    )
    parser.add_argument(
        "--server",
        default=None,
        help=f"audience service or gateway (default ${TARGET_ENV} or {DEFAULT_TARGET})",
    )
    parser.add_argument("--api-key", default=os.environ.get("FLASHCROWD_API_KEY"), help="gateway API key")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of the call in seconds")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def read_values(path: str | Path, column: str | None = None) -> Iterator[str]:
    """Identifiers from a CSV (header row; ``column`` or the first) or a .txt file (one per line)."""
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        if path.suffix.lower() == ".txt":
            for line in handle:
                value = line.rstrip("\r\n")
                if value.strip():
                    yield value
            return
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        index = 0
        if column is not None:
            if column not in header:
                raise CliError(f"{path}: no column {column!r}; the header has {', '.join(header)}")
            index = header.index(column)
        for row in reader:
            if len(row) > index and row[index].strip():
                yield row[index]


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--label {item!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def run_upload(args: argparse.Namespace) -> int:
    import grpc
    from flashcrowd.audience.v1 import audience_service_pb2 as api
    from flashcrowd.audience.v1 import audience_service_pb2_grpc
    from google.protobuf import json_format

    from services.audience.uploads import hash_at_edge, upload_requests
    from services.runtime import error_details

    values = list(read_values(args.file, args.column))
    edge_invalid: list[tuple[int, str]] = []
    sent_rows: list[int] | None = None  # file row of each sent digest, when they differ
    if args.raw:
        hashed = hash_at_edge(args.id_type, values)
        digests, edge_invalid = hashed.hashes, hashed.invalid_rows
        skipped = {index for index, _ in edge_invalid}
        sent_rows = [i for i in range(len(values)) if i not in skipped]
        hash_type = api.HASH_TYPE_SHA256
    else:
        digests = values
        hash_type = api.HASH_TYPE_SHA256 if args.hash == "sha256" else api.HASH_TYPE_MD5
    del values  # raw values go no further than this function
    if not digests:
        raise CliError(
            f"{args.file}: no identifiers to upload" + (" (every row was invalid)" if edge_invalid else "")
        )

    header = api.UploadPackHeader(
        parent=f"tenants/{args.tenant}",
        pack_id=args.pack_id,
        display_name=args.display_name,
        labels=_labels(args.label),
        id_type=f"ID_TYPE_{args.id_type.upper()}",  # an enum value by name
        hash_type=hash_type,
    )
    target = args.server or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    # Through the gateway with an API key; straight to a backend only with the platform's assertion key.
    metadata = (
        (("x-api-key", args.api_key),)
        if args.api_key
        else (
            AssertionSigner(load_assertion_key()).metadata(
                Caller.platform("cli"), "/flashcrowd.audience.v1.AudienceService/UploadPack"
            ),
        )
    )
    with grpc.insecure_channel(target) as channel:
        stub = audience_service_pb2_grpc.AudienceServiceStub(channel)
        try:
            response = stub.UploadPack(
                upload_requests(header, digests, chunk_rows=CHUNK_ROWS),
                timeout=args.timeout,
                metadata=metadata,
            )
        except grpc.RpcError as error:
            details = error_details(error)
            lines = [f"{details.code.name}: {details.message}"]
            lines += [f"  {field}: {description}" for field, description in details.field_violations]
            raise CliError("\n".join(lines)) from None

    # Row numbers are 0-based data rows of the file (the server counts sent digests: map them back).
    server_invalid = [
        (sent_rows[r.index] if sent_rows is not None else r.index, r.reason) for r in response.invalid_rows
    ]
    result: dict[str, Any] = {
        "pack": json_format.MessageToDict(response.pack),
        "stats": json_format.MessageToDict(response.stats, always_print_fields_with_no_presence=True),
        "invalidRows": [{"row": i, "reason": r} for i, r in server_invalid],
        "invalidBeforeSending": [{"row": i, "reason": r} for i, r in edge_invalid[:1000]],
    }
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    stats = response.stats
    print(
        f"{response.pack.name}: {response.pack.size:,} members; received {stats.received:,}, "
        f"valid {stats.valid:,}, invalid {stats.invalid:,}, duplicates {stats.duplicates:,}, "
        f"matched {stats.matched:,} ({stats.match_rate:.1%})"
    )
    if edge_invalid:
        print(f"{len(edge_invalid):,} row(s) could not be normalised and were not sent:")
        for index, reason in edge_invalid[:20]:
            print(f"  row {index}: {reason}")
    if server_invalid:
        print(f"{stats.invalid:,} row(s) rejected by the server:")
        for index, reason in server_invalid[:20]:
            print(f"  row {index}: {reason}")
    return 0


__all__ = ["add_upload_arguments", "read_values", "run_upload"]
