"""Scopes of flashcrowd principals, shared by the gateway (admission) and the backends (enforcement).

Two kinds of caller hold scopes:

* **tenant principals** (advertisers' API keys and JWTs) hold only ``TENANT_SCOPES``: they build
  packs, read sizes, estimates, personas and reports, ingest their own conversion events and target
  packs through campaigns. They never see a member of a pack or an identifier of a platform user.
* **platform principals** (the platform's own services and jobs: ad serving, offer push, batch jobs)
  may also hold ``PLATFORM_SCOPES``: member-level reads and writes, the platform's first-party event
  stream and lookalike model training.

A tenant credential that claims a platform scope never gets it (the gateway drops it from JWTs and
refuses it when an API key is created); backends check the kind of caller again.
"""

from __future__ import annotations

PACKS_READ = "packs.read"
PACKS_WRITE = "packs.write"
CAMPAIGNS_READ = "campaigns.read"
CAMPAIGNS_WRITE = "campaigns.write"
#: A tenant's own conversion events (stamped with the tenant by the gateway).
EVENTS_WRITE = "events.write"
ADMIN = "admin"

#: Member-level reads: ExportPack, CheckMembership (packs and live packs), the offer stream.
MEMBERS_READ = "members.read"
#: Member-level writes: claims, redemptions and refunds of a user's coupon.
MEMBERS_WRITE = "members.write"
#: The platform's first-party behaviour stream (events owned by the platform).
PLATFORM_EVENTS_WRITE = "events.platform"
#: Training the platform-owned lookalike models every tenant expands with.
MODELS_TRAIN = "models.train"

TENANT_SCOPES = frozenset({PACKS_READ, PACKS_WRITE, CAMPAIGNS_READ, CAMPAIGNS_WRITE, EVENTS_WRITE, ADMIN})
PLATFORM_SCOPES = frozenset({MEMBERS_READ, MEMBERS_WRITE, PLATFORM_EVENTS_WRITE, MODELS_TRAIN})
ALL_SCOPES = TENANT_SCOPES | PLATFORM_SCOPES

__all__ = [
    "ADMIN",
    "ALL_SCOPES",
    "CAMPAIGNS_READ",
    "CAMPAIGNS_WRITE",
    "EVENTS_WRITE",
    "MEMBERS_READ",
    "MEMBERS_WRITE",
    "MODELS_TRAIN",
    "PACKS_READ",
    "PACKS_WRITE",
    "PLATFORM_EVENTS_WRITE",
    "PLATFORM_SCOPES",
    "TENANT_SCOPES",
]
