"""What a tenant may learn about platform users: differentially private counts above a minimum.

Advertisers see aggregates, never members; and an aggregate must not single a person out, even when
a tenant asks cleverly (persona of "everyone minus X" against "everyone minus X, plus a 1-member
pack"; sizes of two packs differing in one user; many copies of one pack to average noise away).
The mechanism (stated in services/audience/PRIVACY.md with its parameters):

* **Laplace noise** on every count a tenant principal sees: pack sizes, upload match counts, size
  estimates, persona bucket counts and totals. Sizes have sensitivity 1 and get ``epsilon_size``;
  a persona spends ``epsilon_persona`` split over its parts (size, totals, five dimensions), with each
  user's interests and categories capped so that the sensitivity of every part is bounded.
* **Deterministic per member set**: the noise is drawn from a generator seeded with
  HMAC(secret, kind | fingerprint | label), where the fingerprint is the content hash of the member
  set (a pack version's etag hash, a sample's bitmap hash). The same members always get the same
  answer, so repeating a query, or building a hundred identical packs, averages nothing away.
* **A daily budget per tenant** (``daily_budget`` epsilon, privacy_ledger.py): each *new* member set
  costs its epsilon once; past the budget, sizes read 0 with disclosure BUDGET_EXHAUSTED and
  personas are RESOURCE_EXHAUSTED with a QuotaFailure naming the budget.
* **Minimums on the noisy value**: sizes below ``min_reported_size`` (100) read 0 with disclosure
  BELOW_MINIMUM ("fewer than 100"); personas need ``persona_min_size`` (1,000) noisy members.

Platform principals (and servicer calls without a context, in unit tests) get exact counts; they
see members anyway. The secret is derived from the identity pepper, which only audience holds: a
tenant that knew it could subtract the noise.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
from flashcrowd.audience.v1 import pack_pb2
from pyroaring import BitMap

from services.audience.persona import CATEGORY_CAP, INTEREST_CAP
from services.audience.privacy_ledger import PrivacyLedger, Release
from services.runtime import ResourceExhausted
from services.runtime.assertion import Caller

EXACT = pack_pb2.SIZE_DISCLOSURE_EXACT
NOISY = pack_pb2.SIZE_DISCLOSURE_NOISY
BELOW_MINIMUM = pack_pb2.SIZE_DISCLOSURE_BELOW_MINIMUM
BUDGET_EXHAUSTED = pack_pb2.SIZE_DISCLOSURE_BUDGET_EXHAUSTED

#: Parts of a persona's epsilon: size, profiled total, categorised total, five dimensions.
PERSONA_PARTS = 8
#: Sensitivity (L1) of each part: one user changes each single-valued count by at most 1.
PERSONA_SENSITIVITY = {"interest": INTEREST_CAP, "category": CATEGORY_CAP}

#: ``noise(label, true_count) -> disclosed count`` used by persona.compute_persona.
CountNoise = Callable[[str, int], int]


@dataclass(frozen=True)
class PrivacyParameters:
    min_reported_size: int = 100
    persona_min_size: int = 1000
    epsilon_size: float = 0.5
    epsilon_persona: float = 3.0
    daily_budget: float = 60.0


def fingerprint_of_bitmap(bitmap: BitMap) -> str:
    return hashlib.sha256(bytes(bitmap.serialize())).hexdigest()[:32]


def fingerprint_of_pack(pack: pack_pb2.Pack) -> str:
    """The content part of a stored version's etag (``W/"{version}-{sha256 prefix}"``)."""
    etag = pack.etag.strip('W/"')
    _, _, digest = etag.partition("-")
    return digest or f"{pack.name}@{pack.version}"


def is_exact_for(caller: Caller | None) -> bool:
    return caller is None or caller.is_platform


def _noisy(secret: bytes, kind: str, fingerprint: str, label: str, true_count: int, scale: float) -> int:
    """``true_count`` plus Laplace noise seeded by the release (the same release, the same noise)."""
    seed = hmac.digest(secret, f"{kind}|{fingerprint}|{label}".encode(), "sha256")[:16]
    noise = float(np.random.default_rng(int.from_bytes(seed, "big")).laplace(0.0, scale))
    return max(0, round(true_count + noise))


@dataclass(frozen=True)
class PersonaNoise:
    """The noise of one persona's counts; a plain value, so a compute process can apply it."""

    secret: bytes
    fingerprint: str
    #: The epsilon of each of the persona's parts.
    part: float

    def __call__(self, label: str, true_count: int) -> int:
        scale = PERSONA_SENSITIVITY.get(label.split("|", 1)[0], 1) / self.part
        return _noisy(self.secret, "persona", self.fingerprint, label, true_count, scale)


class Discloser:
    """Applies the mechanism to what tenant principals are about to see."""

    def __init__(self, secret: bytes, ledger: PrivacyLedger, parameters: PrivacyParameters) -> None:
        self._secret = hmac.digest(secret, b"flashcrowd aggregate noise", "sha256")
        self.ledger = ledger
        self.parameters = parameters

    # --- noise --------------------------------------------------------------------------------
    def noisy(self, kind: str, fingerprint: str, label: str, true_count: int, scale: float) -> int:
        return _noisy(self._secret, kind, fingerprint, label, true_count, scale)

    # --- sizes --------------------------------------------------------------------------------
    def size(self, tenant: str, fingerprint: str, true_size: int) -> tuple[int, int]:
        """``(disclosed size, disclosure)`` of a member set for ``tenant`` (charges its budget)."""
        p = self.parameters
        if not self.ledger.charge(tenant, [Release("size", fingerprint, p.epsilon_size)], p.daily_budget):
            return 0, BUDGET_EXHAUSTED
        value = self.noisy("size", fingerprint, "", true_size, 1.0 / p.epsilon_size)
        if value < p.min_reported_size:
            return 0, BELOW_MINIMUM
        return value, NOISY

    def pack(self, pack: pack_pb2.Pack, caller: Caller | None) -> pack_pb2.Pack:
        """``pack`` as ``caller`` may see it (a copy for tenants; the same object for the platform)."""
        if is_exact_for(caller):
            pack.size_disclosure = EXACT
            return pack
        assert caller is not None and caller.tenant is not None
        shown = pack_pb2.Pack()
        shown.CopyFrom(pack)
        if pack.state != pack_pb2.Pack.STATE_READY:
            shown.size = 0
            shown.ClearField("size_disclosure")
            return shown
        shown.size, disclosure = self.size(caller.tenant, fingerprint_of_pack(pack), pack.size)
        shown.size_disclosure = cast(pack_pb2.SizeDisclosure, disclosure)
        # Counts about members beyond the size: dropped for tenants.
        shown.build_stats.bots_excluded = 0
        shown.build_stats.events_matched = 0
        if pack.HasField("upload_stats"):
            stats = shown.upload_stats
            stats.matched = shown.size
            stats.matched_disclosure = shown.size_disclosure
            stats.match_rate = shown.size / stats.valid if stats.valid and shown.size else 0.0
        return shown

    def live_size(self, live_pack: str, minute: int, true_size: int) -> tuple[int, int]:
        """A live pack's size for its tenant: noise drawn once per live pack and minute, below the
        minimum read 0. Not charged to the budget (a live size changes every minute): a weaker
        guarantee than stored packs' sizes, stated in PRIVACY.md."""
        p = self.parameters
        value = self.noisy("live", f"{live_pack}@{minute}", "", true_size, 1.0 / p.epsilon_size)
        if value < p.min_reported_size:
            return 0, BELOW_MINIMUM
        return value, NOISY

    def estimate(self, tenant: str, sample: BitMap, scale_up: float) -> tuple[int, int, int]:
        """``(noisy sample count, disclosed estimate, disclosure)`` of a size estimate's sample."""
        p = self.parameters
        fingerprint = fingerprint_of_bitmap(sample)
        if not self.ledger.charge(tenant, [Release("estimate", fingerprint, p.epsilon_size)], p.daily_budget):
            return 0, 0, BUDGET_EXHAUSTED
        noisy_sample = self.noisy("estimate", fingerprint, "", len(sample), 1.0 / p.epsilon_size)
        estimate = round(noisy_sample * scale_up)
        if estimate < p.min_reported_size:
            return 0, 0, BELOW_MINIMUM
        return noisy_sample, estimate, NOISY

    # --- personas -----------------------------------------------------------------------------
    def persona_noise(self, tenant: str, fingerprint: str, name: str) -> PersonaNoise:
        """The noise of one persona (charging ``epsilon_persona``); RESOURCE_EXHAUSTED past the budget."""
        p = self.parameters
        if not self.ledger.charge(
            tenant, [Release("persona", fingerprint, p.epsilon_persona)], p.daily_budget
        ):
            spent = self.ledger.spent(tenant)
            raise ResourceExhausted(
                f"tenants/{tenant} has spent its privacy budget for today ({spent:g} of {p.daily_budget:g} "
                "epsilon); personas of packs already shown stay available, new ones renew at 00:00 UTC",
                violations=[(f"tenants/{tenant}", f"privacy budget {p.daily_budget:g} epsilon per day")],
                reason="PRIVACY_BUDGET_EXHAUSTED",
                metadata={"pack": name},
            )
        return PersonaNoise(self._secret, fingerprint, p.epsilon_persona / PERSONA_PARTS)


__all__ = [
    "BELOW_MINIMUM",
    "BUDGET_EXHAUSTED",
    "CATEGORY_CAP",
    "EXACT",
    "INTEREST_CAP",
    "NOISY",
    "CountNoise",
    "Discloser",
    "PrivacyParameters",
    "fingerprint_of_bitmap",
    "fingerprint_of_pack",
    "is_exact_for",
]
