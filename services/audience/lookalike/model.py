"""Lookalike clustering models: MiniBatchKMeans over a standardised feature snapshot.

Why MiniBatchKMeans (the argument, also in docs/lookalike.md):

* Expansion needs a partition of the *whole* population into cells whose seed over-representation
  can be counted, plus a metric inside each cell. k-means gives exactly that (Voronoi cells with a
  Euclidean metric on the standardised space the features are designed for), and assigning a new
  or refreshed user is one nearest-centroid lookup.
* Scale: fitting is O(n·k·d) per pass and MiniBatchKMeans reaches within a few percent of Lloyd's
  inertia after a fraction of a pass. We fit on a uniform sample of at most ``fit_sample`` users
  (500k ≈ 7,800 per cluster at k=64, far more than centroid estimates need) and then *assign*
  every user shard by shard, so memory stays bounded at 5M+ users.
* The alternatives: GaussianMixture gives soft memberships but costs O(n·k·d²) per EM step with
  full covariances and is fragile on one-hot columns (singular covariances); Birch needs a
  threshold tuned to the data scale and its tree grows with n; DBSCAN/HDBSCAN/OPTICS are
  O(n log n)–O(n²), leave many users as "noise" (no cell to score) and have no ``predict`` for
  new users; AgglomerativeClustering/Spectral are quadratic; BisectingKMeans is a reasonable
  variant but full-batch. k-means' weakness (spherical, equal-variance cells) is acceptable
  because the cells only need to be *homogeneous enough* for the seed rate to vary between them;
  the distance refinement inside a cell ranks what the cells cannot separate.

Persistence: no pickles. A model version is ``centers.npy`` (float32, k×d) plus a JSON manifest
(feature schema and fingerprint, scaler, snapshot, cluster sizes, inertia, parameters), published
manifest last under ``{root}models/{model_id}/v{n}/``. Reloading needs only numpy.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sklearn.cluster import MiniBatchKMeans

from services.audience.lookalike.features import FEATURE_VERSION, FeatureSchema, FeatureSnapshot, Scaler
from services.storage import ObjectNotFound, ObjectStore, publish, read_manifest

log = logging.getLogger(__name__)

__all__ = [
    "ALGORITHM",
    "DEFAULT_CLUSTERS",
    "LookalikeModel",
    "assign",
    "latest_model_id",
    "list_model_ids",
    "load_model",
    "train_model",
]

ALGORITHM = "MiniBatchKMeans"
DEFAULT_CLUSTERS = 64
FORMAT = "flashcrowd.lookalike.model/v1"
MODEL_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
_VERSION_DIR = re.compile(r"v(\d+)/$")
_ASSIGN_CHUNK = 131_072

Progress = Callable[[float, str], None]


def assign(centers: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of each row: ``(labels int32, squared distances float32)``, chunked."""
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int32)
    dist = np.empty(n, dtype=np.float32)
    c = centers.astype(np.float32, copy=False)
    c_sq = np.einsum("ij,ij->i", c, c)
    for lo in range(0, n, _ASSIGN_CHUNK):
        chunk = x[lo : lo + _ASSIGN_CHUNK]
        d2 = c_sq[None, :] - 2.0 * (chunk @ c.T)
        best = np.argmin(d2, axis=1)
        labels[lo : lo + len(chunk)] = best
        x_sq = np.einsum("ij,ij->i", chunk, chunk)
        dist[lo : lo + len(chunk)] = np.maximum(d2[np.arange(len(chunk)), best] + x_sq, 0.0)
    return labels, dist


@dataclass
class LookalikeModel:
    """A trained model version, as published (centres + manifest)."""

    model_id: str
    version: int
    centers: np.ndarray
    schema: FeatureSchema
    scaler: Scaler
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return f"lookalikeModels/{self.model_id}"

    @property
    def cluster_count(self) -> int:
        return int(self.centers.shape[0])

    @property
    def feature_schema(self) -> str:
        return str(self.manifest["feature_schema"])

    @property
    def feature_version(self) -> int:
        return int(self.manifest["feature_version"])

    @property
    def feature_snapshot(self) -> str:
        return str(self.manifest["feature_snapshot"])

    @property
    def population(self) -> int:
        return int(self.manifest["population"])

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.manifest["created"].replace("Z", "+00:00"))

    def transform(self, raw: np.ndarray) -> np.ndarray:
        return self.scaler.transform(raw)

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return assign(self.centers, x)


def _model_prefix(root: str, model_id: str) -> str:
    return f"{root}models/{model_id}/"


def _versions(store: ObjectStore, root: str, model_id: str) -> list[int]:
    found = []
    for info in store.list(_model_prefix(root, model_id), recursive=True):
        if info.key.endswith("/manifest.json"):
            m = _VERSION_DIR.search(info.key.removesuffix("manifest.json"))
            if m:
                found.append(int(m.group(1)))
    return sorted(found)


def list_model_ids(store: ObjectStore, root: str) -> list[str]:
    ids = []
    for info in store.list(f"{root}models/", recursive=False):
        if info.key.endswith("/"):
            ids.append(info.key.rstrip("/").rsplit("/", 1)[-1])
    return sorted(ids)


def load_model(store: ObjectStore, root: str, model_id: str, version: int | None = None) -> LookalikeModel:
    """The latest (or given) version; ``ObjectNotFound`` if there is none."""
    if version is None:
        versions = _versions(store, root, model_id)
        if not versions:
            raise ObjectNotFound(f"{_model_prefix(root, model_id)}")
        version = versions[-1]
    prefix = f"{_model_prefix(root, model_id)}v{version}/"
    manifest = read_manifest(store, prefix + "manifest.json")
    centers = np.load(io.BytesIO(store.get_bytes(prefix + "centers.npy")), allow_pickle=False)
    schema = FeatureSchema.from_json(manifest["schema"])
    return LookalikeModel(
        model_id=model_id,
        version=version,
        centers=centers.astype(np.float32, copy=False),
        schema=schema,
        scaler=Scaler.from_json(manifest["scaler"]),
        manifest=manifest,
    )


def latest_model_id(store: ObjectStore, root: str) -> str | None:
    """The model whose newest version was created last (None when there is no model)."""
    best: tuple[str, str] | None = None
    for model_id in list_model_ids(store, root):
        versions = _versions(store, root, model_id)
        if not versions:
            continue
        try:
            doc = read_manifest(store, f"{_model_prefix(root, model_id)}v{versions[-1]}/manifest.json")
        except (ObjectNotFound, ValueError):
            continue
        key = (str(doc.get("created", "")), model_id)
        if best is None or key > best:
            best = key
    return best[1] if best else None


def _sample(snapshot: FeatureSnapshot, limit: int, rng: np.random.Generator) -> np.ndarray:
    fraction = min(1.0, limit / max(snapshot.population, 1))
    parts = []
    for _ids, raw in snapshot.iter_shards():
        if fraction < 1.0:
            keep = rng.random(raw.shape[0]) < fraction
            raw = raw[keep]
        parts.append(snapshot.scaler.transform(raw))
    if not parts:
        return np.zeros((0, len(snapshot.schema.columns)), np.float32)
    return np.concatenate(parts)


def train_model(
    store: ObjectStore,
    snapshot: FeatureSnapshot,
    *,
    model_id: str,
    root: str = "lookalike/",
    clusters: int = DEFAULT_CLUSTERS,
    seed: int = 0,
    fit_sample: int = 500_000,
    n_init: int = 3,
    progress: Progress | None = None,
) -> LookalikeModel:
    """Fit on a sample of the snapshot, assign every user (cluster sizes, inertia), publish a version."""
    if not MODEL_ID.fullmatch(model_id):
        raise ValueError(f"invalid model id {model_id!r}: 1-63 chars of [a-z0-9-], starting with a letter")
    if snapshot.population < clusters:
        raise ValueError(
            f"feature snapshot {snapshot.snapshot_id} has {snapshot.population} users; "
            f"at least cluster_count={clusters} are needed"
        )
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    x = _sample(snapshot, fit_sample, rng)
    if progress:
        progress(20.0, "fit")
    fit_started = time.perf_counter()
    km = MiniBatchKMeans(
        n_clusters=clusters,
        batch_size=4096,
        n_init=n_init,
        max_iter=100,
        random_state=seed,
        reassignment_ratio=0.01,
    )
    km.fit(x)
    fit_seconds = time.perf_counter() - fit_started
    centers = km.cluster_centers_.astype(np.float32)
    del x
    if progress:
        progress(60.0, "score")

    sizes = np.zeros(clusters, dtype=np.int64)
    inertia = 0.0
    for _ids, raw in snapshot.iter_shards():
        labels, dist = assign(centers, snapshot.scaler.transform(raw))
        sizes += np.bincount(labels, minlength=clusters)
        inertia += float(dist.sum(dtype=np.float64))
    if progress:
        progress(90.0, "publish")

    created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    manifest = {
        "format": FORMAT,
        "model_id": model_id,
        "algorithm": ALGORITHM,
        "cluster_count": clusters,
        "feature_version": FEATURE_VERSION,
        "feature_schema": snapshot.fingerprint,
        "feature_snapshot": snapshot.snapshot_id,
        "schema": snapshot.schema.to_json(),
        "scaler": snapshot.scaler.to_json(),
        "population": int(sizes.sum()),
        "cluster_sizes": sizes.tolist(),
        "inertia_per_user": inertia / max(int(sizes.sum()), 1),
        "params": {
            "seed": seed,
            "fit_sample": fit_sample,
            "fit_rows": int(min(fit_sample, snapshot.population)),
            "batch_size": 4096,
            "n_init": n_init,
            "max_iter": 100,
        },
        "fit_seconds": round(fit_seconds, 3),
        "train_seconds": round(time.perf_counter() - started, 3),
        "created": created,
    }
    buffer = io.BytesIO()
    np.save(buffer, centers, allow_pickle=False)
    payload = buffer.getvalue()
    for _attempt in range(5):  # a concurrent training of the same id took our version: take the next
        versions = _versions(store, root, model_id)
        version = (versions[-1] + 1) if versions else 1
        prefix = f"{_model_prefix(root, model_id)}v{version}/"
        try:
            doc = publish(
                store,
                data={prefix + "centers.npy": payload},
                manifest_key=prefix + "manifest.json",
                manifest={**manifest, "version": version},
            )
            break
        except FileExistsError:
            continue
    else:
        raise RuntimeError(f"could not allocate a version for model {model_id!r}")
    log.info(
        "lookalike model %s v%d: k=%d, %d users, inertia/user %.3f",
        model_id,
        version,
        clusters,
        doc["population"],
        doc["inertia_per_user"],
    )
    return LookalikeModel(model_id, version, centers, snapshot.schema, snapshot.scaler, doc)


def iter_models(store: ObjectStore, root: str) -> Iterator[LookalikeModel]:
    for model_id in list_model_ids(store, root):
        try:
            yield load_model(store, root, model_id)
        except (ObjectNotFound, ValueError, json.JSONDecodeError):
            continue
