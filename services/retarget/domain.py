"""Retarget domain: names, money math, deterministic arm assignment, ids and clocks.

Pure functions, no I/O: the repository and the servicer share them, and tests call them directly.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.runtime.tenant_ids import valid_tenant_id

#: Anything above this many fen (10^12 fen = 10 billion yuan) is refused as absurd.
MAX_FEN = 10**12
BASIS_POINTS = 10_000
MAX_HOLDOUT_BP = 5_000
DEFAULT_CURRENCY = "CNY"
HOLDOUT_ARM = "holdout"
DEFAULT_ARM = "control"
#: User ids are stored as BIGINT.
MAX_USER_ID = 2**63 - 1

TEMPLATE_TYPE = "flashcrowd.dev/CouponTemplate"
CAMPAIGN_TYPE = "flashcrowd.dev/Campaign"
COUPON_TYPE = "flashcrowd.dev/Coupon"
PACK_TYPE = "flashcrowd.dev/Pack"
OPERATION_TYPE = "google.longrunning.Operation"

# Campaign states as stored (the proto enum without the STATE_ prefix).
DRAFT, RUNNING, PAUSED, COMPLETED, CANCELLED = "DRAFT", "RUNNING", "PAUSED", "COMPLETED", "CANCELLED"
# Coupon states as stored; EXPIRED is derived at read time from expire_us.
ISSUED, REDEEMED, VOID = "ISSUED", "REDEEMED", "VOID"

# Launch outcomes of one audience member.
OUTCOME_ISSUED = "ISSUED"
OUTCOME_HOLDOUT = "HOLDOUT"
OUTCOME_OUT_OF_STOCK = "SKIPPED_OUT_OF_STOCK"
OUTCOME_BUDGET = "SKIPPED_BUDGET_EXHAUSTED"
OUTCOME_PER_USER_LIMIT = "SKIPPED_PER_USER_LIMIT"
OUTCOME_LOSS_CAP = "SKIPPED_LOSS_CAP"
OUTCOME_TEMPLATE_EXPIRED = "SKIPPED_TEMPLATE_EXPIRED"

# ErrorInfo reasons (AIP-193, UPPER_SNAKE).
OUT_OF_STOCK = "OUT_OF_STOCK"
BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
PER_USER_LIMIT = "PER_USER_LIMIT"
COUPON_EXPIRED = "COUPON_EXPIRED"
COUPON_NOT_YET_VALID = "COUPON_NOT_YET_VALID"
COUPON_ALREADY_REDEEMED = "COUPON_ALREADY_REDEEMED"
COUPON_VOID = "COUPON_VOID"
COUPON_NOT_REDEEMED = "COUPON_NOT_REDEEMED"
MIN_SPEND_NOT_MET = "MIN_SPEND_NOT_MET"
ITEM_NOT_APPLICABLE = "ITEM_NOT_APPLICABLE"
CAMPAIGN_NOT_LAUNCHED = "CAMPAIGN_NOT_LAUNCHED"
CAMPAIGN_PAUSED = "CAMPAIGN_PAUSED"
CAMPAIGN_CANCELLED = "CAMPAIGN_CANCELLED"
CAMPAIGN_ENDED = "CAMPAIGN_ENDED"
CAMPAIGN_NOT_STARTED = "CAMPAIGN_NOT_STARTED"
CAMPAIGN_STATE = "CAMPAIGN_STATE_CONFLICT"
USER_IN_HOLDOUT = "USER_IN_HOLDOUT"
TEMPLATE_EXPIRED = "TEMPLATE_EXPIRED"
PACK_NOT_READY = "PACK_NOT_READY"
IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"

_ID = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
_COUPON_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_ARM_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def now_us() -> int:
    return time.time_ns() // 1000


def valid_id(value: str) -> bool:
    """AIP-122 resource id: lower-case letters, digits and hyphens, starting with a letter."""
    return bool(_ID.fullmatch(value))


def valid_arm_id(value: str) -> bool:
    return bool(_ARM_ID.fullmatch(value)) and value != HOLDOUT_ARM


# --- resource names ----------------------------------------------------------------------------


def parse_parent(name: str) -> str | None:
    """``tenants/{t}`` -> ``t``, or None when malformed."""
    parts = name.split("/")
    if len(parts) == 2 and parts[0] == "tenants" and valid_tenant_id(parts[1]):
        return parts[1]
    return None


def parse_name(name: str, collection: str) -> tuple[str, str] | None:
    """``tenants/{t}/{collection}/{id}`` -> ``(t, id)``, or None when malformed."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "tenants" or parts[2] != collection:
        return None
    tenant, rid = parts[1], parts[3]
    if not valid_tenant_id(tenant):
        return None
    pattern = _COUPON_ID if collection == "coupons" else _ID
    if not pattern.fullmatch(rid):
        return None
    return tenant, rid


def template_name(tenant: str, template_id: str) -> str:
    return f"tenants/{tenant}/couponTemplates/{template_id}"


def campaign_name(tenant: str, campaign_id: str) -> str:
    return f"tenants/{tenant}/campaigns/{campaign_id}"


def coupon_name(tenant: str, coupon_id: str) -> str:
    return f"tenants/{tenant}/coupons/{coupon_id}"


def launch_operation_name(tenant: str, campaign_id: str) -> str:
    return f"{campaign_name(tenant, campaign_id)}/operations/launch"


def parse_operation_name(name: str) -> tuple[str, str] | None:
    if not name.endswith("/operations/launch"):
        return None
    return parse_name(name[: -len("/operations/launch")], "campaigns")


# --- money -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Discount:
    """Either a fixed amount off (``basis_points == 0``) or a percentage with a cap."""

    amount_fen: int = 0
    basis_points: int = 0
    cap_fen: int = 0

    @property
    def is_percent(self) -> bool:
        return self.basis_points > 0

    @property
    def face_value_fen(self) -> int:
        """What one coupon may cost at most: the amount, or the cap of a percentage."""
        return self.cap_fen if self.is_percent else self.amount_fen

    def apply(self, order_amount_fen: int) -> int:
        """Discount on an order in integer fen: percent floored, capped, never above the order."""
        if order_amount_fen <= 0:
            return 0
        if self.is_percent:
            discount = min(order_amount_fen * self.basis_points // BASIS_POINTS, self.cap_fen)
        else:
            discount = self.amount_fen
        return max(0, min(discount, order_amount_fen))


# --- arms --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmSpec:
    arm_id: str
    weight: int
    template_pk: int
    template_id: str


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def campaign_seed(tenant: str, campaign_id: str, create_us: int) -> int:
    """A campaign's hashing seed, stored with it so assignment never changes (63-bit, BIGINT-safe)."""
    digest = hashlib.sha256(f"{tenant}/{campaign_id}/{create_us}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def arm_share_bp(weight: int, total_weight: int, holdout_bp: int) -> float:
    """An arm's expected share of the audience in basis points: the treated share split by weight."""
    return (BASIS_POINTS - holdout_bp) * weight / (total_weight or 1)


def assign_arms(
    user_ids: np.ndarray | Sequence[int], seed: int, holdout_bp: int, weights: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic assignment: ``(arm_index, in_holdout)`` per user.

    A user is in the holdout when ``h1 mod 10000 < holdout_bp`` with ``h1 = mix(user ^ seed)``; the
    arm comes from an independent ``h2 = mix(h1)`` against the cumulative weights. Vectorised
    (a million users in milliseconds); the same user and campaign always land in the same arm.
    """
    users = np.asarray(user_ids, dtype=np.uint64)
    h1 = _splitmix64(users ^ np.uint64(seed))
    holdout = (h1 % np.uint64(BASIS_POINTS)).astype(np.int64) < holdout_bp
    h2 = _splitmix64(h1)
    cumulative = np.cumsum(np.asarray(weights, dtype=np.uint64))
    total = cumulative[-1]
    arm = np.searchsorted(cumulative, h2 % total, side="right")
    return arm.astype(np.int64), holdout


# --- ids ---------------------------------------------------------------------------------------


def new_coupon_id() -> str:
    """Time-ordered (B-tree friendly) and unguessable: ``c`` + 12 hex of ms + 12 random hex."""
    return f"c{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def new_coupon_ids(count: int) -> list[str]:
    prefix = f"c{time.time_ns() // 1_000_000:012x}"
    blob = secrets.token_hex(6 * count)
    return [prefix + blob[i * 12 : (i + 1) * 12] for i in range(count)]


def request_hash(*parts: object) -> str:
    """Stable digest of a request's content, to tell a retry from a reuse of its key."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
