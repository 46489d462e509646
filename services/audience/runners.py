"""The portable job kinds and their runners, the same in the server and in ``audience-worker``.

A portable job's operation carries everything it needs (its payload), so whichever process claims
it from the shared queue runs it against its own store: pack builds (``pack_builds.py``) and
lookalike trainings and expansions (``lookalike/jobs.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from services.audience.config import AudienceSettings
from services.audience.lookalike.jobs import EXPAND_KIND, TRAIN_KIND, LookalikeJobs
from services.audience.lookalike.service import LookalikeSettings
from services.audience.operations import PortableRunner
from services.audience.pack_builds import BUILD_KINDS, PackBuilds
from services.audience.packstore import PackStore
from services.runtime import load_settings
from services.storage import ObjectStore

__all__ = ["portable_runners"]


def portable_runners(
    settings: AudienceSettings,
    store: ObjectStore,
    packs: PackStore,
    *,
    invalidate: Callable[[str, str], None] | None = None,
) -> dict[str, PortableRunner]:
    """Runner of each portable kind; ``invalidate`` drops this process's cached bitmap of a pack."""
    builds = PackBuilds(store, packs, settings.dataset_prefix, invalidate=invalidate)
    root = load_settings(LookalikeSettings).root
    lookalike = LookalikeJobs(store, packs, settings.dataset_prefix, root, invalidate=invalidate)
    return {**dict.fromkeys(BUILD_KINDS, builds.run), TRAIN_KIND: lookalike.train,
            EXPAND_KIND: lookalike.expand}  # fmt: skip
