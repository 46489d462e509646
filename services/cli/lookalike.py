"""``flashcrowd lookalike``: train models and expand seed packs without the server (batch Jobs).

    flashcrowd lookalike train --model-id m1 [--clusters K] [--fits 5] [--as-of 2025-06-19T00:00:00Z]
                               [--exclude-features 'types=pay,refund' ...]
    flashcrowd lookalike features --like-model m1          (fresh features the model can score)
    flashcrowd lookalike expand --tenant T --seed-pack buyers --pack-id buyers-lal5 --reach 0.05
                                [--model m1] [--model-version 2 | --refresh-model]
                                [--exclude-features 'categories=7 items=100,101' ...]
                                [--exclude-pack P ...] [--age-band 25_30 ...] ...

``--exclude-features`` is one exclusion rule (repeatable): space-separated ``types=``,
``categories=``, ``items=`` lists; an event is kept out of the features when it matches every list
of a rule (services/audience/lookalike/exclusion.py).
    flashcrowd lookalike show --model m1
    flashcrowd lookalike refresh [--dry-run] [--now T]   (the lookalike-refresh CronJob)

Same code as the LookalikeService (``services.audience.lookalike.pipeline``), same checks and
messages; the results land in the store the service reads. Exit status: 0 ok, 2 bad input or state
(the message names the field), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

from services.cli.common import CliError, add_store_argument, open_store_arg

NAME = "lookalike"
HELP = "train lookalike models and expand seed packs (batch path of the LookalikeService)"


def _common(p: argparse.ArgumentParser) -> None:
    add_store_argument(p)
    p.add_argument(
        "--prefix",
        default=os.environ.get("FLASHCROWD_DATASET_PREFIX") or "data/",
        help="key prefix of the event dataset (default: $FLASHCROWD_DATASET_PREFIX or data/)",
    )
    p.add_argument(
        "--root",
        default=os.environ.get("FLASHCROWD_LOOKALIKE_ROOT") or "lookalike/",
        help="key prefix of features and models (default: $FLASHCROWD_LOOKALIKE_ROOT or lookalike/)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def _when(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO time like 2025-06-19T00:00:00Z, got {text!r}"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _exclusion_rule(text: str) -> Any:
    from services.audience.lookalike.exclusion import ExclusionRule
    from services.events.schema import EventType

    names = {e.label: int(e) for e in EventType}
    fields: dict[str, tuple[int, ...]] = {}
    try:
        for token in text.replace(";", " ").split():
            key, _, values = token.partition("=")
            items = [v for v in values.split(",") if v]
            if key == "types":
                fields["event_types"] = tuple(names[v] if v in names else int(v) for v in items)
            elif key in ("categories", "items"):
                fields["category_ids" if key == "categories" else "item_ids"] = tuple(int(v) for v in items)
            else:
                raise ValueError(f"unknown key {key!r} (types, categories, items)")
        return ExclusionRule(**fields)
    except (KeyError, ValueError) as error:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {error} (e.g. 'types=pay,refund categories=7'; types: {', '.join(names)})"
        ) from None


def _exclusion(rules: list[Any]) -> Any:
    from services.audience.lookalike.exclusion import FeatureExclusion

    return FeatureExclusion(tuple(rules))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lookalike_command", metavar="SUBCOMMAND", required=True)

    train = sub.add_parser("train", help="build a feature snapshot and fit a model (a new model version)")
    _common(train)
    train.add_argument(
        "--model-id", required=True, help="model id (1-63 of [a-z0-9-], starting with a letter)"
    )
    train.add_argument(
        "--clusters",
        type=int,
        default=None,
        help="clusters per fit (default: round(sqrt(users)), at most 64)",
    )
    train.add_argument("--fits", type=int, default=5, help="independent clusterings kept (default 5)")
    train.add_argument(
        "--exclude-features", type=_exclusion_rule, action="append", default=[], metavar="RULE",
        help="events kept out of the features, e.g. 'types=pay,refund' (repeatable)",
    )  # fmt: skip
    train.add_argument(
        "--as-of", type=_when, default=None, help="feature reference time (default: end of data)"
    )
    train.add_argument("--shards", type=int, default=None, help="feature shards (default: ~400k users each)")
    train.add_argument("--seed", type=int, default=0, help="random seed of the fit")
    train.set_defaults(_lookalike_run=_train)

    feats = sub.add_parser(
        "features", help="build a feature snapshot (with --like-model: that model's schema)"
    )
    _common(feats)
    feats.add_argument(
        "--like-model", default=None, help="model whose schema to reuse (so it can score them)"
    )
    feats.add_argument("--as-of", type=_when, default=None, help="reference time (default: end of data)")
    feats.add_argument("--shards", type=int, default=None)
    feats.set_defaults(_lookalike_run=_features)

    exp = sub.add_parser("expand", help="expand a seed pack into a new lookalike pack version")
    _common(exp)
    exp.add_argument("--tenant", required=True)
    exp.add_argument("--seed-pack", required=True, help="seed pack id of the tenant")
    exp.add_argument("--pack-id", required=True, help="id of the pack to create (or refresh)")
    reach = exp.add_mutually_exclusive_group(required=True)
    reach.add_argument("--reach", type=float, help="share of the population in [0.01, 0.20]")
    reach.add_argument("--reach-size", type=int, help="absolute number of users")
    exp.add_argument("--model", default="", help="model id (default: the newest)")
    version = exp.add_mutually_exclusive_group()
    version.add_argument(
        "--model-version", type=int, default=0, help="model version (default: pinned on refresh, else newest)"
    )
    version.add_argument(
        "--refresh-model", action="store_true", help="on a refresh, use the newest model version"
    )
    exp.add_argument(
        "--exclude-features",
        type=_exclusion_rule,
        action="append",
        default=[],
        metavar="RULE",
        help="events kept out of the features, e.g. 'categories=7' (repeatable; the seed spec's "
        "behaviour is excluded automatically)",
    )
    exp.add_argument("--exclude-pack", action="append", default=[], help="pack id whose members are excluded")
    exp.add_argument("--include-seed", action="store_true", help="keep seed members in the result")
    exp.add_argument(
        "--negative-pack", action="append", default=[], help="pack id of users to move away from (repeatable)"
    )
    exp.add_argument("--weight-by-spend", action="store_true", help="weigh seed members by their net spend")
    exp.add_argument("--age-band", action="append", default=[], help="e.g. 25_30 (repeatable)")
    exp.add_argument("--gender", action="append", default=[], help="female or male (repeatable)")
    exp.add_argument("--region", action="append", default=[], help="e.g. CN-GD (repeatable)")
    exp.add_argument("--interest", action="append", default=[], help="e.g. apparel (repeatable)")
    exp.add_argument("--min-seed", type=int, default=100, help="smallest seed expanded (default 100)")
    exp.add_argument("--include-bots", action="store_true", help="do not remove bots from seed and result")
    exp.add_argument(
        "--packs-prefix",
        default=os.environ.get("FLASHCROWD_PACKS_PREFIX") or "packs/",
        help="key prefix of packs (default: $FLASHCROWD_PACKS_PREFIX or packs/)",
    )
    exp.set_defaults(_lookalike_run=_expand)

    ref = sub.add_parser(
        "refresh", help="re-expand the lookalike packs that are due (interval elapsed or new seed version)"
    )
    _common(ref)
    ref.add_argument("--now", type=_when, default=None, help="the time to judge by (default: now)")
    ref.add_argument("--dry-run", action="store_true", help="list what is due; expand nothing")
    ref.add_argument("--min-seed", type=int, default=100, help="the server's minimum seed (default 100)")
    ref.add_argument("--include-bots", action="store_true", help="do not remove bots from seed and result")
    ref.add_argument(
        "--packs-prefix",
        default=os.environ.get("FLASHCROWD_PACKS_PREFIX") or "packs/",
        help="key prefix of packs (default: $FLASHCROWD_PACKS_PREFIX or packs/)",
    )
    ref.set_defaults(_lookalike_run=_refresh)

    show = sub.add_parser("show", help="print a model")
    _common(show)
    show.add_argument("--model", default="", help="model id (default: the newest)")
    show.set_defaults(_lookalike_run=_show)


def run(args: argparse.Namespace) -> int:
    from services.runtime.errors import InvalidArgument, ServiceError

    try:
        return int(args._lookalike_run(args) or 0)
    except InvalidArgument as exc:
        lines = "\n".join(f"  {field}: {description}" for field, description in exc.violations)
        raise CliError(f"invalid input:\n{lines}") from None
    except ServiceError as exc:
        raise CliError(exc.message) from None


def _progress(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(progress(stage, fraction), done())`` on stderr: one updating line on a terminal, else a
    line per stage and per 10% (Job logs); nothing with ``--json``."""
    tty = sys.stderr.isatty()
    last: list[tuple[str, int]] = []

    def progress(stage: str, fraction: float) -> None:
        if args.json:
            return
        if tty:
            print(f"\r{stage:<22} {100 * fraction:5.1f}%", end="", file=sys.stderr, flush=True)
            return
        step = (stage, int(10 * max(0.0, min(1.0, fraction))))
        if not last or last[-1] != step:
            last.append(step)
            print(f"{stage:<22} {100 * fraction:5.1f}%", file=sys.stderr, flush=True)

    def done() -> None:
        if tty and not args.json:
            print(file=sys.stderr)

    return progress, done


def _dataset(store: Any, prefix: str) -> Any:
    from services.events.dataset import DatasetNotFound, EventDataset

    try:
        return EventDataset(store, prefix)
    except DatasetNotFound as exc:
        raise CliError(str(exc)) from None


def _print(args: argparse.Namespace, doc: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        json.dump(doc, sys.stdout, indent=1, default=str)
        print()
    else:
        print("\n".join(lines))


def _model_doc(model: Any) -> dict[str, Any]:
    m = model.manifest
    return {
        "name": model.name,
        "version": model.version,
        "algorithm": m["algorithm"],
        "cluster_count": model.cluster_count,
        "fits": model.fits,
        "cluster_rule": m.get("cluster_rule", "fixed"),
        "feature_exclusion": model.exclusion.to_json(),
        "population": model.population,
        "feature_schema": model.feature_schema,
        "feature_snapshot": model.feature_snapshot,
        "columns": len(model.schema.columns),
        "inertia_per_user": m.get("inertia_per_user"),
        "fit_seconds": m.get("fit_seconds"),
        "train_seconds": m.get("train_seconds"),
        "created": m.get("created"),
    }


def _model_lines(doc: dict[str, Any]) -> list[str]:
    return [
        f"model     {doc['name']} v{doc['version']} ({doc['algorithm']}, k={doc['cluster_count']} x "
        f"{doc['fits']} fits; k: {doc['cluster_rule']})",
        f"excluded  {_exclusion_text(doc['feature_exclusion'])}",
        f"features  {doc['feature_snapshot']} ({doc['columns']} columns, {doc['feature_schema'][:19]}...)",
        f"users     {doc['population']:,}; inertia/user {doc['inertia_per_user']:.3f}",
        f"took      fit {doc['fit_seconds']}s, total {doc['train_seconds']}s",
    ]


def _exclusion_text(doc: list[dict[str, list[int]]]) -> str:
    from services.audience.lookalike.exclusion import FeatureExclusion

    return FeatureExclusion.from_json(doc).describe()


def _train(args: argparse.Namespace) -> int:
    from services.audience.lookalike import pipeline
    from services.audience.lookalike.model import MODEL_ID
    from services.runtime.errors import InvalidArgument

    if not MODEL_ID.fullmatch(args.model_id):
        raise InvalidArgument("--model-id", "1-63 chars of [a-z0-9-], starting with a letter")
    if args.clusters is not None and not 2 <= args.clusters <= 1024:
        raise InvalidArgument("--clusters", f"{args.clusters} is outside [2, 1024]")
    if not 1 <= args.fits <= 32:
        raise InvalidArgument("--fits", f"{args.fits} is outside [1, 32]")
    store = open_store_arg(args.store)
    dataset = _dataset(store, args.prefix)
    if args.clusters is not None and args.clusters > dataset.population_size():
        raise InvalidArgument(
            "--clusters", f"{args.clusters} clusters for {dataset.population_size():,} users"
        )

    progress, done = _progress(args)
    model, _snapshot = pipeline.train(
        store, dataset, model_id=args.model_id, root=args.root, clusters=args.clusters, as_of=args.as_of,
        seed=args.seed, shards=args.shards, fits=args.fits, exclusion=_exclusion(args.exclude_features),
        progress=progress,
    )  # fmt: skip
    done()
    doc = _model_doc(model)
    _print(args, doc, _model_lines(doc))
    return 0


def _features(args: argparse.Namespace) -> int:
    from services.audience.lookalike import pipeline

    store = open_store_arg(args.store)
    dataset = _dataset(store, args.prefix)
    like = None
    if args.like_model:
        try:
            like = pipeline.resolve_model(store, args.root, args.like_model)
        except pipeline.LookalikeError as exc:
            raise pipeline.as_service_error(exc, "--like-model") from None
    snap = pipeline.build_features(
        store, dataset, root=args.root, as_of=args.as_of, like_model=like, shards=args.shards
    )
    doc = {
        "snapshot": snap.snapshot_id,
        "as_of": snap.manifest["as_of"],
        "population": snap.population,
        "schema": snap.fingerprint,
        "shards": len(snap.shard_keys()),
        "build_seconds": snap.manifest.get("build_seconds"),
    }
    _print(args, doc, [f"{k:<11} {v}" for k, v in doc.items()])
    return 0


def _show(args: argparse.Namespace) -> int:
    from services.audience.lookalike import pipeline

    store = open_store_arg(args.store)
    try:
        model = pipeline.resolve_model(store, args.root, args.model or None)
    except pipeline.LookalikeError as exc:
        raise pipeline.as_service_error(exc, "--model") from None
    doc = _model_doc(model)
    _print(args, doc, _model_lines(doc))
    return 0


def _expand(args: argparse.Namespace) -> int:
    from pyroaring import BitMap

    from services.audience.lookalike import pipeline
    from services.audience.packstore import PackStore, check_ids
    from services.events.schema import AGE_BAND_NAMES, GENDER_NAMES
    from services.runtime.errors import InvalidArgument

    check_ids(args.tenant, args.pack_id)
    check_ids(args.tenant, args.seed_pack)
    for pid in [*args.exclude_pack, *args.negative_pack]:
        check_ids(args.tenant, pid)
    if args.reach is not None and not 0.01 <= args.reach <= 0.20:
        raise InvalidArgument("--reach", f"{args.reach:g} is outside [0.01, 0.2] of the population")
    if args.min_seed < 1:
        raise InvalidArgument("--min-seed", "must be at least 1")
    if args.model_version < 0:
        raise InvalidArgument("--model-version", "must be 0 (pinned/newest) or a version")
    bands = {v: k for k, v in AGE_BAND_NAMES.items() if k}
    genders = {v: k for k, v in GENDER_NAMES.items() if k}
    bad = [("--age-band", b) for b in args.age_band if b not in bands]
    bad += [("--gender", g) for g in args.gender if g not in genders]
    if bad:
        raise InvalidArgument([(f, f"unknown value {v!r}") for f, v in bad])
    store = open_store_arg(args.store)
    packs = PackStore(store, args.packs_prefix)
    request = pipeline.ExpandRequest(
        tenant=args.tenant,
        pack_id=args.pack_id,
        seed_pack=args.seed_pack,
        exclude_packs=list(args.exclude_pack),
        model_id=args.model,
        reach_fraction=args.reach,
        reach_size=args.reach_size,
        include_seed=args.include_seed,
        age_bands=tuple(bands[b] for b in args.age_band),
        genders=tuple(genders[g] for g in args.gender),
        regions=tuple(args.region),
        interests=tuple(args.interest),
        model_version=args.model_version,
        refresh_model=args.refresh_model,
        exclusion=_exclusion(args.exclude_features),
        negative_packs=list(args.negative_pack),
        seed_weighting="spend" if args.weight_by_spend else "uniform",
    )

    def dataset() -> Any:
        return _dataset(store, args.prefix)

    bots = BitMap()
    if not args.include_bots:
        from services.audience.bots import bot_bitmap

        bots = bot_bitmap(dataset())
    prepared = pipeline.prepare_expansion(
        store, args.root, packs, dataset, request, min_seed=args.min_seed, bots=bots
    )
    progress, done = _progress(args)
    stored, result = pipeline.execute_expansion(
        store, args.root, packs, prepared, min_seed=args.min_seed, progress=progress
    )
    done()
    inputs = prepared.inputs
    doc = {
        "pack": stored.name,
        "version": stored.version,
        "size": stored.size,
        "model": inputs.model.name,
        "model_version": inputs.model.version,
        "model_version_reason": inputs.version_reason,
        "feature_exclusion": inputs.snapshot.exclusion.to_json(),
        **result.stats(),
    }
    auc = "n/a" if doc["heldout_auc"] is None else f"{doc['heldout_auc']:.3f}"
    blend = ", ".join(f"{k} {v:.2f}" for k, v in result.blend.items())
    lines = [
        f"pack      {stored.name} v{stored.version}: {stored.size:,} users ({stored.display_name})",
        f"model     {inputs.model.name} v{inputs.model.version} ({inputs.version_reason}); features without "
        f"{inputs.snapshot.exclusion.describe()}",
        f"seed      {result.seed_matched:,} of {result.seed_size:,} in the population of "
        f"{result.population:,}; "
        f"{result.clusters_covered} of {result.cluster_count} clusters covered, "
        f"{result.seed_concentration:.0%} in the top 10% of clusters",
        f"ranking   {blend} ({result.blend_rule}); held-out seed AUC {auc}",
        "expected lift (held-out halves of the seed, 95% interval):",
    ]
    for s in result.lift_curve:
        mark = "  <- requested" if s.requested else ""
        figure = f"withheld: {s.withheld}" if s.withheld else f"{s.lift:6.2f}x [{s.low:.2f}, {s.high:.2f}]"
        lines.append(f"  {s.reach_fraction:>6.1%} reach  {s.size:>10,} users  {figure}{mark}")
    lines.append(
        "tiers     "
        + ", ".join(f"{t.start_fraction:.0%}-{t.end_fraction:.0%}: {t.size:,}" for t in result.tiers)
    )
    _print(args, doc, lines)
    return 0


def _refresh(args: argparse.Namespace) -> int:
    from pyroaring import BitMap

    from services.audience.lookalike.refresh import due_refreshes, run_refreshes
    from services.audience.packstore import PackStore

    store = open_store_arg(args.store)
    packs = PackStore(store, args.packs_prefix)
    now = args.now or datetime.now(UTC)
    due, skipped = due_refreshes(store, args.root, packs, now)
    outcomes = list(skipped)
    if args.dry_run:
        from services.audience.lookalike.refresh import RefreshOutcome

        outcomes += [RefreshOutcome(d.name, "due", "; ".join(d.reasons), d.version) for d in due]
    elif due:

        def dataset() -> Any:
            return _dataset(store, args.prefix)

        bots = BitMap()
        if not args.include_bots:
            from services.audience.bots import bot_bitmap

            bots = bot_bitmap(dataset())
        outcomes += run_refreshes(store, args.root, packs, dataset, due, min_seed=args.min_seed, bots=bots)
    doc = {
        "now": now.isoformat(),
        "outcomes": [
            {"pack": o.name, "status": o.status, "detail": o.detail, "version": o.version} for o in outcomes
        ],
    }
    lines = [f"{o.status:<9} {o.name}{f' v{o.version}' if o.version else ''}: {o.detail}" for o in outcomes]
    _print(args, doc, lines or ["nothing due"])
    return 1 if any(o.status == "failed" for o in outcomes) else 0
