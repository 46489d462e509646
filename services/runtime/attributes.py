"""Domain-prefixed span attribute and metric names, kept in one place.

Dashboards and alerts key on these strings, so a service never spells one inline: it imports the
constant (``span.set_attribute(attributes.PACK_SIZE, size)``). Add new names here, grouped by
resource, always under the ``flashcrowd.`` prefix; generic names use the OpenTelemetry semantic
conventions instead (``rpc.*``, ``db.*``, ``messaging.*``).
"""

from __future__ import annotations

PREFIX = "flashcrowd."

# --- span / log attributes -----------------------------------------------------------------
TENANT = "flashcrowd.tenant"
SHARD = "flashcrowd.shard"
SHARD_COUNT = "flashcrowd.shard.count"

PACK_NAME = "flashcrowd.pack.name"
PACK_VERSION = "flashcrowd.pack.version"
PACK_SIZE = "flashcrowd.pack.size"
PACK_KIND = "flashcrowd.pack.kind"

UPLOAD_RECEIVED = "flashcrowd.upload.received"
UPLOAD_MATCHED = "flashcrowd.upload.matched"
UPLOAD_INVALID = "flashcrowd.upload.invalid"

LOOKALIKE_SEED_SIZE = "flashcrowd.lookalike.seed_size"
LOOKALIKE_REACH = "flashcrowd.lookalike.reach"
LOOKALIKE_MODEL_VERSION = "flashcrowd.lookalike.model_version"

CAMPAIGN_NAME = "flashcrowd.campaign.name"
CAMPAIGN_ARM = "flashcrowd.campaign.arm"
COUPON_TEMPLATE = "flashcrowd.coupon.template"
IDEMPOTENCY_KEY = "flashcrowd.idempotency_key"

EVENT_TYPE = "flashcrowd.event.type"
EVENT_BATCH_SIZE = "flashcrowd.event.batch_size"

# --- metric names (instrument name; unit goes in the instrument's ``unit``) -----------------
METRIC_PACK_BUILD_DURATION = "flashcrowd.pack.build.duration"  # histogram, s
METRIC_PACK_SIZE = "flashcrowd.pack.size"  # histogram, {user}
METRIC_PACK_BUILDS = "flashcrowd.pack.builds"  # counter, {build}
METRIC_UPLOAD_ROWS = "flashcrowd.upload.rows"  # counter, {row}, attribute "outcome"
METRIC_COUPONS_ISSUED = "flashcrowd.coupon.issued"  # counter, {coupon}
METRIC_COUPONS_REDEEMED = "flashcrowd.coupon.redeemed"  # counter, {coupon}
METRIC_EVENTS_INGESTED = "flashcrowd.event.ingested"  # counter, {event}
METRIC_GATEWAY_RATE_LIMITED = "flashcrowd.gateway.rate_limited"  # counter, {request}
METRIC_GATEWAY_REQUESTS = "flashcrowd.gateway.requests"  # counter, {request}
METRIC_GATEWAY_DURATION = "flashcrowd.gateway.duration"  # histogram, s
METRIC_GATEWAY_ERRORS = "flashcrowd.gateway.errors"  # counter, {request}
METRIC_GATEWAY_RETRIES = "flashcrowd.gateway.retries"  # counter, {retry}
