"""Pack builds as portable jobs: any audience replica or worker process can run one from its payload.

The payload is the pack as the caller asked for it (``Pack`` with ``name`` set to the pack's resource
name, spec and options); the operation's metadata names the version it should become. A build that
runs again after its first owner died (``JobContext.attempt`` > 1) first looks at the pack's newest
versions: if one was published by this operation (the manifest records the operation; a version
whose pointer the dead owner had not written yet is completed then), the build is already done and
its pack is returned, so a retried build never publishes twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flashcrowd.audience.v1 import pack_pb2
from opentelemetry import metrics, trace

from services.audience import builder as pack_builder
from services.audience.operations import JobContext, OperationCancelled
from services.audience.packstore import PackStore
from services.audience.tenancy import parse_pack_name
from services.events.dataset import DatasetNotFound, EventDataset
from services.runtime import FailedPrecondition, attributes
from services.storage import ObjectStore

tracer = trace.get_tracer("flashcrowd.audience")
meter = metrics.get_meter("flashcrowd.audience")
BUILDS = meter.create_counter(
    attributes.METRIC_PACK_BUILDS, unit="{build}", description="Pack builds by outcome"
)
BUILD_DURATION = meter.create_histogram(
    attributes.METRIC_PACK_BUILD_DURATION, unit="s", description="Wall time of pack builds"
)
PACK_SIZE = meter.create_histogram(
    attributes.METRIC_PACK_SIZE, unit="{user}", description="Members of new packs"
)

#: Operation kinds whose jobs ``PackBuilds.run`` executes.
BUILD_KINDS = ("CreatePack", "RefreshPack")


def open_dataset(store: ObjectStore, prefix: str) -> EventDataset:
    """A snapshot of the event dataset (blocking: reads its manifest); FAILED_PRECONDITION if none."""
    try:
        return EventDataset(store, prefix)
    except DatasetNotFound as error:
        raise FailedPrecondition(
            "DATASET_MISSING", f"no event dataset: {error}", [("DATASET_MISSING", "dataset", str(error))]
        ) from None


def build_payload(tenant_pack_name: str, template: pack_pb2.Pack) -> bytes:
    """What a build operation carries: the requested pack, named."""
    pack = pack_pb2.Pack()
    pack.CopyFrom(template)
    pack.name = tenant_pack_name
    return pack.SerializeToString()


class PackBuilds:
    """Runs build payloads against the dataset and publishes the result (see the module doc)."""

    def __init__(
        self,
        store: ObjectStore,
        packs: PackStore,
        dataset_prefix: str,
        *,
        invalidate: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.packs = packs
        self.dataset_prefix = dataset_prefix
        #: Drops a cached bitmap in this process (other processes re-read the pointer on their own).
        self.invalidate = invalidate

    def run(self, ctx: JobContext, payload: bytes) -> pack_pb2.Pack:
        template = pack_pb2.Pack.FromString(payload)
        tenant, pack_id = parse_pack_name(template.name, "pack.name")
        started = time.monotonic()
        outcome = "error"
        try:
            with tracer.start_as_current_span(
                "audience.build_pack",
                attributes={
                    attributes.TENANT: tenant,
                    attributes.PACK_NAME: template.name,
                    "flashcrowd.operation": ctx.operation,
                    "flashcrowd.operation.attempt": ctx.attempt,
                },
            ) as span:
                stored = self._already_published(tenant, pack_id, ctx) if ctx.attempt > 1 else None
                if stored is None:
                    stored = self._build(ctx, tenant, pack_id, template)
                span.set_attribute(attributes.PACK_VERSION, stored.version)
                span.set_attribute(attributes.PACK_SIZE, stored.size)
                PACK_SIZE.record(stored.size, {attributes.PACK_KIND: "spec"})
                outcome = "ok"
                return stored
        except OperationCancelled:
            outcome = "cancelled"
            raise
        finally:
            BUILDS.add(1, {"outcome": outcome})
            BUILD_DURATION.record(time.monotonic() - started, {"outcome": outcome})

    def _already_published(self, tenant: str, pack_id: str, ctx: JobContext) -> pack_pb2.Pack | None:
        return self.packs.published_by(tenant, pack_id, ctx.operation)

    def _build(self, ctx: JobContext, tenant: str, pack_id: str, template: pack_pb2.Pack) -> pack_pb2.Pack:
        ctx.progress("compile", 0.0)
        dataset = open_dataset(self.store, self.dataset_prefix)

        def progress(stage: str, fraction: float) -> None:
            ctx.progress(stage, 5.0 + 85.0 * max(0.0, min(1.0, fraction)))

        result = pack_builder.build_pack(
            dataset,
            template.spec,
            template.options,
            resolve_pack=self.packs.resolve_pack(tenant),
            resolve_spec=self.packs.resolve_spec(tenant),
            pack_name=template.name,
            progress=progress,
            tenant=tenant,
        )
        ctx.progress("publish", 95.0)  # last chance to cancel: nothing is written before this
        pack = pack_pb2.Pack()
        pack.CopyFrom(template)
        pack.source = pack_pb2.Pack.SOURCE_SPEC
        del pack.inputs[:]
        pack.inputs.extend(result.inputs)
        stored = self.packs.publish_version(
            tenant, pack_id, result.bitmap, pack, result.stats,
            resolved_spec=result.resolved_spec, operation=ctx.operation,
        )  # fmt: skip
        if self.invalidate is not None:
            self.invalidate(tenant, pack_id)
        return stored


__all__ = ["BUILD_KINDS", "PackBuilds", "build_payload", "open_dataset"]
