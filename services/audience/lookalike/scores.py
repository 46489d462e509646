"""The ranked members of a lookalike pack version: user id, rank, tier, score (member-level data).

Stored beside the expansion record as ``{root}expansions/{tenant}/{pack}/v000003.scores.parquet``,
written *before* the pack version is published, so every visible lookalike version has its ranking
(a failed publish leaves a file that the next attempt at that version overwrites). Read only by
``ExportLookalikeScores`` for platform principals (``members.read``); tenants see tier sizes only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import polars as pl

from services.storage import ObjectNotFound, ObjectStore

__all__ = ["RankedMembers", "read_scores", "scores_key", "write_scores"]


def scores_key(root: str, tenant: str, pack_id: str, version: int) -> str:
    return f"{root}expansions/{tenant}/{pack_id}/v{version:06d}.scores.parquet"


@dataclass(frozen=True)
class RankedMembers:
    user_ids: np.ndarray  # uint32, best first
    tiers: np.ndarray  # uint8 tier index per rank
    scores: np.ndarray  # float64 per rank

    def __len__(self) -> int:
        return len(self.user_ids)


def write_scores(
    store: ObjectStore, root: str, tenant: str, pack_id: str, version: int, ranked: RankedMembers
) -> None:
    frame = pl.DataFrame(
        {
            "user_id": ranked.user_ids.astype(np.uint32),
            "tier": ranked.tiers.astype(np.uint8),
            "score": ranked.scores.astype(np.float64),
        }
    )
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd", statistics=True)
    store.put_bytes(
        scores_key(root, tenant, pack_id, version), buffer.getvalue(), "application/vnd.apache.parquet"
    )


def read_scores(
    store: ObjectStore, root: str, tenant: str, pack_id: str, version: int
) -> RankedMembers | None:
    """The stored ranking of a version, in rank order; None when the version has none."""
    try:
        data = store.get_bytes(scores_key(root, tenant, pack_id, version))
    except ObjectNotFound:
        return None
    frame = pl.read_parquet(io.BytesIO(data))
    return RankedMembers(
        frame["user_id"].to_numpy().astype(np.uint32),
        frame["tier"].to_numpy().astype(np.uint8),
        frame["score"].to_numpy().astype(np.float64),
    )
