"""``flashcrowd pack``: build packs without the server (Kubernetes Jobs), merge shards, show and list.

    flashcrowd pack build spec.yaml --tenant T --pack-id P [--shard i/n --run-id R]
    flashcrowd pack merge --tenant T --pack-id P --shards n --run-id R
    flashcrowd pack show --tenant T --pack-id P [--version N]
    flashcrowd pack list --tenant T [--filter 'labels.k=v AND state=READY']
    flashcrowd pack upload FILE --tenant T --pack-id P --id-type phone --raw   (via the service)

``build`` runs the same builder as the audience service. Without ``--shard`` it publishes a new
version; with ``--shard i/n`` it stages that shard's part under ``packs/{tenant}/{pack}/staging/{run}/``
and ``merge`` publishes the union once all n parts are there (an Indexed Job per shard, then one merge
Job). Exit status: 0 ok, 2 bad input (the message names the field, and the line for spec files), 1
anything else.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from services.cli.common import CliError, add_store_argument, open_store_arg

NAME = "pack"
HELP = "build (whole or one shard), merge, show and list audience packs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="pack_command", metavar="SUBCOMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tenant", required=True, help="tenant id")
        add_store_argument(p)
        p.add_argument(
            "--packs-prefix",
            default=os.environ.get("FLASHCROWD_PACKS_PREFIX") or "packs/",
            help="key prefix of packs (default: $FLASHCROWD_PACKS_PREFIX or packs/, as the service)",
        )
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    build = sub.add_parser("build", help="build a pack (or one shard of it) from a YAML/JSON spec file")
    build.add_argument("spec", help="spec file: a PackSpec or {displayName, labels, spec, options, ttl}")
    common(build)
    build.add_argument("--pack-id", required=True, help="pack id (1-63 of [a-z0-9-], starting with a letter)")
    build.add_argument(
        "--prefix",
        default=os.environ.get("FLASHCROWD_DATASET_PREFIX") or "data/",
        help="key prefix of the event dataset (default: $FLASHCROWD_DATASET_PREFIX or data/)",
    )
    build.add_argument("--shard", default=None, metavar="I/N", help="build only user shard I of N")
    build.add_argument("--run-id", default=None, help="id shared by the shards of one build (with --shard)")
    build.add_argument("--include-bots", action="store_true", help="keep users flagged as bots")
    build.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    build.set_defaults(_pack_run=_build)

    merge = sub.add_parser("merge", help="publish the union of a run's shard parts as one version")
    common(merge)
    merge.add_argument("--pack-id", required=True)
    merge.add_argument("--shards", type=int, required=True, help="number of shards of the run")
    merge.add_argument("--run-id", required=True)
    merge.add_argument("--keep-staging", action="store_true", help="do not delete the shard parts")
    merge.set_defaults(_pack_run=_merge)

    show = sub.add_parser("show", help="print one pack")
    common(show)
    show.add_argument("--pack-id", required=True)
    show.add_argument("--version", type=int, default=0, help="version (default: latest)")
    show.set_defaults(_pack_run=_show)

    from services.cli.pack_upload import add_upload_arguments, run_upload

    upload = sub.add_parser(
        "upload", help="upload identifiers as a pack (UploadPack); --raw hashes them here"
    )
    add_upload_arguments(upload)
    upload.set_defaults(_pack_run=run_upload)

    lst = sub.add_parser("list", help="list a tenant's packs, newest first")
    common(lst)
    lst.add_argument("--filter", default="", help="e.g. 'labels.campaign=618 AND state=READY'")
    lst.add_argument("--page-size", type=int, default=50)
    lst.add_argument("--page-token", default="")
    lst.set_defaults(_pack_run=_list)


def run(args: argparse.Namespace) -> int:
    from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

    try:
        return int(args._pack_run(args) or 0)
    except InvalidArgument as exc:
        lines = "\n".join(f"  {field}: {description}" for field, description in exc.violations)
        raise CliError(f"invalid input:\n{lines}") from None
    except (NotFound, FailedPrecondition) as exc:
        raise CliError(exc.message) from None


# --- subcommands -------------------------------------------------------------------------------------


def _packstore(args: argparse.Namespace, *, existing: bool = False) -> Any:
    from services.audience.packstore import PackStore

    try:
        return PackStore(open_store_arg(args.store, existing=existing), args.packs_prefix)
    except ValueError as exc:
        raise CliError(f"--packs-prefix: {exc}") from None


def _build(args: argparse.Namespace) -> int:
    from flashcrowd.audience.v1 import pack_pb2
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from services.audience.builder import build_pack
    from services.audience.names import pack_name
    from services.audience.packstore import check_ids
    from services.audience.spec_io import read_document, with_lines
    from services.audience.spec_validation import validate_spec
    from services.events.dataset import DatasetNotFound, EventDataset
    from services.events.sharding import parse as parse_shard
    from services.runtime.errors import InvalidArgument

    check_ids(args.tenant, args.pack_id)
    shard = None
    if args.shard is not None:
        try:
            shard = parse_shard(args.shard)
        except ValueError as exc:
            raise InvalidArgument("--shard", str(exc)) from None
        if not args.run_id:
            raise InvalidArgument("--run-id", "required with --shard: the id all shards of this build share")
    elif args.run_id:
        raise InvalidArgument("--run-id", "only meaningful with --shard")

    doc = read_document(args.spec)
    if args.include_bots:
        doc.options.include_bots = True
    try:
        validate_spec(doc.spec, doc.options, field="spec")
    except InvalidArgument as exc:
        raise with_lines(exc, doc) from None

    packs = _packstore(args)
    try:
        dataset = EventDataset(packs.store, args.prefix)
    except DatasetNotFound as exc:
        raise CliError(str(exc)) from None

    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description:<16}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        disable=args.no_progress,
        transient=False,
    ) as bar:
        task = bar.add_task("compile", total=100)
        result = build_pack(
            dataset,
            doc.spec,
            doc.options,
            resolve_pack=packs.resolve_pack(args.tenant),
            resolve_spec=packs.resolve_spec(args.tenant),
            pack_name=pack_name(args.tenant, args.pack_id),
            tenant=args.tenant,
            shard=shard,
            progress=lambda stage, fraction: bar.update(task, description=stage, completed=100 * fraction),
            field="spec",
        )
    pack = pack_pb2.Pack(
        display_name=doc.display_name,
        labels=doc.labels,
        spec=doc.spec,
        options=doc.options,
        source=pack_pb2.Pack.SOURCE_SPEC,
        inputs=result.inputs,
    )
    if doc.ttl is not None:
        pack.ttl.CopyFrom(doc.ttl)

    if shard is not None:
        part = packs.stage_shard(
            args.tenant,
            args.pack_id,
            args.run_id,
            shard,
            result.bitmap,
            pack,
            result.stats,
            resolved_spec=result.resolved_spec,
            files_read=result.files_read,
        )
        summary = {
            "name": pack_name(args.tenant, args.pack_id),
            "run_id": args.run_id,
            "shard": str(shard),
            "size": part.size,
            "staged": part.manifest_key,
            "stats": _stats(result.stats),
        }
        _emit(
            args,
            summary,
            f"staged shard {shard} of {summary['name']}: {part.size:,} members ({part.manifest_key})",
        )
        return 0
    stored = packs.publish_version(
        args.tenant, args.pack_id, result.bitmap, pack, result.stats, resolved_spec=result.resolved_spec
    )
    _emit_pack(args, stored)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from services.audience.packstore import check_ids
    from services.runtime.errors import InvalidArgument

    check_ids(args.tenant, args.pack_id)
    if not 1 <= args.shards <= 256:
        raise InvalidArgument("--shards", f"must be in 1..256, got {args.shards}")
    packs = _packstore(args)
    stored = packs.merge_shards(
        args.tenant, args.pack_id, args.run_id, args.shards, cleanup=not args.keep_staging
    )
    _emit_pack(args, stored)
    return 0


def _show(args: argparse.Namespace) -> int:
    packs = _packstore(args, existing=True)
    _emit_pack(args, packs.get(args.tenant, args.pack_id, args.version), full=True)
    return 0


def _list(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    packs = _packstore(args, existing=True)
    page, token = packs.list(
        args.tenant, page_size=args.page_size, page_token=args.page_token, filter=args.filter
    )
    if args.json:
        out = {"packs": [json_format.MessageToDict(p) for p in page], "nextPageToken": token}
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    for p in page:
        labels = ",".join(f"{k}={v}" for k, v in sorted(p.labels.items()))
        print(f"{p.name}  v{p.version}  {p.size:>12,}  {p.update_time.ToJsonString()}  {labels}")
    if token:
        print(f"next page: --page-token {token}")
    return 0


# --- output ------------------------------------------------------------------------------------------


def _stats(stats: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(stats)


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else text)


def _emit_pack(args: argparse.Namespace, pack: Any, *, full: bool = False) -> None:
    from google.protobuf import json_format

    if args.json or full:
        print(json.dumps(json_format.MessageToDict(pack), indent=2, ensure_ascii=False))
        return
    stats = pack.build_stats
    print(
        f"{pack.name} version {pack.version}: {pack.size:,} members "
        f"({stats.files_read}/{stats.files_total} files, {stats.events_matched:,} events matched, "
        f"{stats.bots_excluded:,} bots excluded, {stats.duration.ToTimedelta().total_seconds():.2f} s)"
    )
