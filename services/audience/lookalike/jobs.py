"""Lookalike training and expansion as portable jobs: any audience replica or ``audience-worker``
runs them, so their fits and scoring never share the serving process's GIL.

**Training.** The payload is the ``TrainLookalikeModelRequest`` as accepted (validated by the RPC);
the runner reads the dataset of its own process's store, fits and publishes the model version. A
run after its first owner died (``JobContext.attempt`` > 1) trains again: the features of that
dataset version are reused, and the dead attempt's version, if it got that far, stays an older
version of the same model.

**Expansion.** The RPC validates and prepares the expansion (seed, model, reach, version) and
queues the request with what it resolved: the model version (so a retrain meanwhile does not change
the audience), the pack version it will become and the versions of the seed and excluded packs.
The runner prepares again in its process and refuses (FAILED_PRECONDITION ``INPUTS_CHANGED``) when
those inputs moved in between; then it ranks and publishes, recording the operation in the
version's manifest. A re-run whose first owner published already ranks again (deterministic) for
the response and publishes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC

from flashcrowd.audience.v1 import lookalike_pb2
from opentelemetry import trace
from pyroaring import BitMap

from services.audience.bots import bot_bitmap
from services.audience.lookalike import pipeline
from services.audience.lookalike.messages import exclusion_from_proto, model_proto, response_proto
from services.audience.operations import JobContext
from services.audience.pack_builds import open_dataset
from services.audience.packstore import PackStore
from services.runtime import FailedPrecondition
from services.storage import ObjectStore

__all__ = ["EXPAND_KIND", "TRAIN_KIND", "LookalikeJobs", "expansion_payload"]

tracer = trace.get_tracer("flashcrowd.audience")

#: The operation kind of a training (portable: ``LookalikeJobs.train`` runs it).
TRAIN_KIND = "TrainLookalikeModel"
#: The operation kind of an expansion (portable: ``LookalikeJobs.expand`` runs it).
EXPAND_KIND = "ExpandLookalike"
#: Where each stage's progress falls in the operation's percent.
_STAGES = {"features": (0.0, 50.0), "fit": (50.0, 80.0), "score": (80.0, 95.0)}


def _refs(prepared: pipeline.PreparedExpansion) -> list[list[object]]:
    return [[ref.pack, ref.version] for ref in prepared.refs]


def expansion_payload(prepared: pipeline.PreparedExpansion, *, exclude_bots: bool, min_seed: int) -> bytes:
    """What an expansion operation carries: the request with its resolved model, version and inputs."""
    request, model = prepared.request, prepared.inputs.model
    doc = {
        "request": {**request.describe(), "model_id": pipeline.model_id_of(model.name),
                    "model_version": model.version},
        "version_reason": prepared.inputs.version_reason,
        "version": prepared.version,
        "refs": _refs(prepared),
        "exclude_bots": exclude_bots,
        "min_seed": min_seed,
    }  # fmt: skip
    return json.dumps(doc, sort_keys=True).encode()


def _expand_request(doc: dict) -> pipeline.ExpandRequest:
    return pipeline.ExpandRequest.from_json(doc)


class LookalikeJobs:
    def __init__(
        self,
        store: ObjectStore,
        packs: PackStore,
        dataset_prefix: str,
        root: str,
        *,
        invalidate: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.packs = packs
        self.dataset_prefix = dataset_prefix
        self.root = root if root.endswith("/") else root + "/"
        #: Drops this process's cached bitmap of a pack it published (others re-read the pointer).
        self.invalidate = invalidate

    def expand(self, ctx: JobContext, payload: bytes) -> lookalike_pb2.ExpandLookalikeResponse:
        doc = json.loads(payload)
        request = _expand_request(doc["request"])
        name = f"tenants/{request.tenant}/packs/{request.pack_id}"
        published = (
            self.packs.published_by(request.tenant, request.pack_id, ctx.operation)
            if ctx.attempt > 1
            else None
        )
        with tracer.start_as_current_span(
            "lookalike.expand",
            attributes={"flashcrowd.pack.name": name, "flashcrowd.operation": ctx.operation,
                        "flashcrowd.operation.attempt": ctx.attempt},
        ) as span:  # fmt: skip
            ctx.progress("prepare", 1.0)
            dataset = open_dataset(self.store, self.dataset_prefix)
            prepared = pipeline.prepare_expansion(
                self.store, self.root, self.packs, lambda: dataset, request, min_seed=int(doc["min_seed"]),
                bots=bot_bitmap(dataset) if doc["exclude_bots"] else BitMap(),
            )  # fmt: skip
            prepared.inputs = replace(prepared.inputs, version_reason=str(doc["version_reason"]))
            if published is None and (prepared.version != doc["version"] or _refs(prepared) != doc["refs"]):
                raise FailedPrecondition(
                    "INPUTS_CHANGED",
                    f"{name}: the seed, excluded packs or the pack itself changed since the expansion was "
                    "accepted; expand again",
                    [("INPUTS_CHANGED", "seed_pack", "a pack this expansion reads has a newer version")],
                )
            span.set_attribute("flashcrowd.lookalike.model", prepared.inputs.model.name)

            def progress(stage: str, fraction_done: float) -> None:
                ctx.progress(stage, 5.0 + 85.0 * max(0.0, min(1.0, fraction_done)))

            ctx.progress("score", 5.0)
            stored, result = pipeline.execute_expansion(
                self.store, self.root, self.packs, prepared, min_seed=int(doc["min_seed"]),
                progress=progress, before_publish=lambda: ctx.progress("publish", 95.0),
                operation=ctx.operation, published=published,
            )  # fmt: skip
            if self.invalidate is not None:
                self.invalidate(request.tenant, request.pack_id)
            span.set_attribute("flashcrowd.pack.size", stored.size)
            inputs = prepared.inputs
            return response_proto(
                stored, result, inputs.model, inputs.snapshot.exclusion, min_seed=prepared.min_seed,
                seed_weighting=request.seed_weighting, seed_version=inputs.seed_version,
                next_refresh=pipeline.next_refresh(request, stored),
            )  # fmt: skip

    def train(self, ctx: JobContext, payload: bytes) -> lookalike_pb2.LookalikeModel:
        request = lookalike_pb2.TrainLookalikeModelRequest.FromString(payload)
        exclusion, problems = exclusion_from_proto(request.feature_exclusions)
        assert not problems, problems  # validated by the RPC before it was queued
        name = f"lookalikeModels/{request.model_id}"

        def progress(stage: str, fraction: float) -> None:
            lo, hi = _STAGES.get(stage, (95.0, 99.0))
            ctx.progress(stage, lo + (hi - lo) * max(0.0, min(1.0, fraction)))

        with tracer.start_as_current_span(
            "lookalike.train",
            attributes={"flashcrowd.lookalike.model": name, "flashcrowd.operation": ctx.operation,
                        "flashcrowd.operation.attempt": ctx.attempt},
        ):  # fmt: skip
            ctx.progress("features", 0.0)
            model, _snapshot = pipeline.train(
                self.store,
                open_dataset(self.store, self.dataset_prefix),
                model_id=request.model_id,
                root=self.root,
                clusters=request.cluster_count or None,
                as_of=request.as_of.ToDatetime(UTC) if request.HasField("as_of") else None,
                exclusion=exclusion,
                progress=progress,
            )
            return model_proto(model)
