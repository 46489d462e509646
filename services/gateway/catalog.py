"""What the gateway serves, read from the proto descriptors: methods, backends, scopes, retries, routes.

Every public method of the fronted services becomes a ``MethodInfo``; nothing is listed by hand except
the two decisions the protos cannot carry: which scope a method needs and whether it may be retried.
Both tables are checked at import against the descriptors, so a new RPC without a scope fails loudly
instead of being served unprotected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import cast

from flashcrowd.audience.v1 import audience_service_pb2, event_service_pb2, live_pack_pb2, lookalike_pb2
from flashcrowd.gateway.v1 import gateway_service_pb2
from flashcrowd.retarget.v1 import retarget_service_pb2, sale_monitor_pb2
from google.api import annotations_pb2, http_pb2
from google.longrunning import operations_proto_pb2
from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message

from services.runtime.scopes import (
    ADMIN,
    ALL_SCOPES,
    CAMPAIGNS_READ,
    CAMPAIGNS_WRITE,
    EVENTS_WRITE,
    MEMBERS_READ,
    MEMBERS_WRITE,
    MODELS_TRAIN,
    PACKS_READ,
    PACKS_WRITE,
    PLATFORM_EVENTS_WRITE,
)

AUDIENCE = "audience"
RETARGET = "retarget"
SALE_MONITOR = "sale_monitor"  # python -m services.monitor
LOCAL = "local"  # served by the gateway itself
ROUTED = "routed"  # google.longrunning.Operations: the backend is found from the operation name

OPERATIONS_SERVICE = "google.longrunning.Operations"
GATEWAY_SERVICE = "flashcrowd.gateway.v1.GatewayService"

# Service -> backend. Order matters only for the OpenAPI document.
SERVICES: dict[str, str] = {
    "flashcrowd.audience.v1.AudienceService": AUDIENCE,
    "flashcrowd.audience.v1.LookalikeService": AUDIENCE,
    "flashcrowd.audience.v1.EventService": AUDIENCE,
    "flashcrowd.audience.v1.LivePackService": AUDIENCE,
    "flashcrowd.retarget.v1.RetargetService": RETARGET,
    "flashcrowd.retarget.v1.SaleMonitorService": SALE_MONITOR,
    OPERATIONS_SERVICE: ROUTED,
    GATEWAY_SERVICE: LOCAL,
}

_FILES = {
    "flashcrowd.audience.v1.AudienceService": audience_service_pb2.DESCRIPTOR,
    "flashcrowd.audience.v1.LookalikeService": lookalike_pb2.DESCRIPTOR,
    "flashcrowd.audience.v1.EventService": event_service_pb2.DESCRIPTOR,
    "flashcrowd.audience.v1.LivePackService": live_pack_pb2.DESCRIPTOR,
    "flashcrowd.retarget.v1.RetargetService": retarget_service_pb2.DESCRIPTOR,
    "flashcrowd.retarget.v1.SaleMonitorService": sale_monitor_pb2.DESCRIPTOR,
    OPERATIONS_SERVICE: operations_proto_pb2.DESCRIPTOR,
    GATEWAY_SERVICE: gateway_service_pb2.DESCRIPTOR,
}

# --- scopes (services/runtime/scopes.py says who may hold which) ------------------------------
#: WhoAmI: any authenticated caller.
ANY = frozenset[str]()

_S = frozenset
#: Method -> the scopes any one of which lets a caller in (``admin`` always does).
SCOPES: dict[str, frozenset[str]] = {
    "AudienceService/CreatePack": _S({PACKS_WRITE}),
    "AudienceService/EstimatePackSize": _S({PACKS_READ}),
    "AudienceService/GetPack": _S({PACKS_READ}),
    "AudienceService/ListPacks": _S({PACKS_READ}),
    "AudienceService/DeletePack": _S({PACKS_WRITE}),
    "AudienceService/RefreshPack": _S({PACKS_WRITE}),
    # Member-level: only platform principals (ad serving, offer push, batch jobs).
    "AudienceService/CheckMembership": _S({MEMBERS_READ}),
    "AudienceService/ExportPack": _S({MEMBERS_READ}),
    "AudienceService/UploadPack": _S({PACKS_WRITE}),
    "AudienceService/GetPackPersona": _S({PACKS_READ}),
    # Models are platform-owned and shared by every tenant: only the platform trains them.
    "LookalikeService/TrainLookalikeModel": _S({MODELS_TRAIN}),
    "LookalikeService/GetLookalikeModel": _S({PACKS_READ}),
    "LookalikeService/ExpandLookalike": _S({PACKS_WRITE}),
    # Per-member ranks and scores of an expansion: member-level.
    "LookalikeService/ExportLookalikeScores": _S({MEMBERS_READ}),
    "LivePackService/CreateLivePack": _S({PACKS_WRITE}),
    "LivePackService/GetLivePack": _S({PACKS_READ}),
    "LivePackService/ListLivePacks": _S({PACKS_READ}),
    "LivePackService/DeleteLivePack": _S({PACKS_WRITE}),
    "LivePackService/SnapshotLivePack": _S({PACKS_WRITE}),
    "SaleMonitorService/GetSaleStats": _S({CAMPAIGNS_READ}),
    "SaleMonitorService/WatchSale": _S({CAMPAIGNS_READ}),
    # A tenant's own conversion events, or the platform's first-party stream.
    "EventService/IngestEvents": _S({EVENTS_WRITE, PLATFORM_EVENTS_WRITE}),
    "EventService/IngestEventBatch": _S({EVENTS_WRITE, PLATFORM_EVENTS_WRITE}),
    "RetargetService/CreateCouponTemplate": _S({CAMPAIGNS_WRITE}),
    "RetargetService/GetCouponTemplate": _S({CAMPAIGNS_READ}),
    "RetargetService/ListCouponTemplates": _S({CAMPAIGNS_READ}),
    "RetargetService/CreateCampaign": _S({CAMPAIGNS_WRITE}),
    "RetargetService/GetCampaign": _S({CAMPAIGNS_READ}),
    "RetargetService/ListCampaigns": _S({CAMPAIGNS_READ}),
    "RetargetService/UpdateCampaign": _S({CAMPAIGNS_WRITE}),
    "RetargetService/LaunchCampaign": _S({CAMPAIGNS_WRITE}),
    "RetargetService/PauseCampaign": _S({CAMPAIGNS_WRITE}),
    "RetargetService/ResumeCampaign": _S({CAMPAIGNS_WRITE}),
    "RetargetService/CancelCampaign": _S({CAMPAIGNS_WRITE}),
    "RetargetService/CopyCampaign": _S({CAMPAIGNS_WRITE}),
    # A user's own coupon: claimed, redeemed, refunded and offered by the platform's serving side.
    "RetargetService/ClaimCoupon": _S({MEMBERS_WRITE}),
    "RetargetService/RedeemCoupon": _S({MEMBERS_WRITE}),
    "RetargetService/RefundRedemption": _S({MEMBERS_WRITE}),
    "RetargetService/StreamOffers": _S({MEMBERS_READ}),
    "RetargetService/GetCampaignReport": _S({CAMPAIGNS_READ}),
    # An operation belongs to a pack build or a campaign launch: either family's scope reads it.
    "Operations/ListOperations": _S({PACKS_READ, CAMPAIGNS_READ}),
    "Operations/GetOperation": _S({PACKS_READ, CAMPAIGNS_READ}),
    "Operations/WaitOperation": _S({PACKS_READ, CAMPAIGNS_READ}),
    "Operations/DeleteOperation": _S({PACKS_WRITE, CAMPAIGNS_WRITE}),
    "Operations/CancelOperation": _S({PACKS_WRITE, CAMPAIGNS_WRITE}),
    "GatewayService/WhoAmI": ANY,
    # Tenant and key administration (admin.py narrows further: system admins, or a tenant's own admin).
    "GatewayService/CreateTenant": _S({ADMIN}),
    "GatewayService/GetTenant": _S({ADMIN}),
    "GatewayService/DeleteTenant": _S({ADMIN}),
    "GatewayService/UndeleteTenant": _S({ADMIN}),
    "GatewayService/PurgeTenant": _S({ADMIN}),
    "GatewayService/CreateApiKey": _S({ADMIN}),
    "GatewayService/GetApiKey": _S({ADMIN}),
    "GatewayService/ListApiKeys": _S({ADMIN}),
    "GatewayService/RevokeApiKey": _S({ADMIN}),
    "GatewayService/ListAuditEntries": _S({ADMIN}),
}

#: Methods a retry cannot harm: reads. Writes are never retried by the gateway (a retried
#: LaunchCampaign or RedeemCoupon is the caller's decision, with its idempotency key).
IDEMPOTENT: frozenset[str] = frozenset(
    {
        "AudienceService/EstimatePackSize",
        "AudienceService/GetPack",
        "AudienceService/ListPacks",
        "AudienceService/CheckMembership",
        "AudienceService/GetPackPersona",
        "LookalikeService/GetLookalikeModel",
        "LivePackService/GetLivePack",
        "LivePackService/ListLivePacks",
        "SaleMonitorService/GetSaleStats",
        "RetargetService/GetCouponTemplate",
        "RetargetService/ListCouponTemplates",
        "RetargetService/GetCampaign",
        "RetargetService/ListCampaigns",
        "RetargetService/GetCampaignReport",
        "Operations/GetOperation",
        "Operations/ListOperations",
        "GatewayService/WhoAmI",
        "GatewayService/GetTenant",
        "GatewayService/GetApiKey",
        "GatewayService/ListApiKeys",
        "GatewayService/ListAuditEntries",
    }
)

# --- audit (audit.py) ---------------------------------------------------------------------
#: Destructive methods, by name prefix: audited, like GatewayService writes and member-level calls.
DESTRUCTIVE_PREFIXES = ("Delete", "Cancel", "Pause", "Revoke")
#: Scopes that make a method member-level (and therefore audited).
MEMBER_SCOPES = frozenset({MEMBERS_READ, MEMBERS_WRITE})

# --- resource fields ---------------------------------------------------------------------
#: String fields (at any depth of a request) that name a tenant's resource and must therefore be
#: under ``tenants/{caller}``.
RESOURCE_FIELDS = frozenset(
    {
        "parent",
        "name",
        "pack",
        "packs",
        "seed_pack",
        "exclude_packs",
        "negative_seed_packs",
        "audience_pack",
        "coupon_template",
        "campaign",
        "coupon",
        "copy_to_pack",
    }
)
#: Fields whose values are not tenant resources (checked only if they claim to be one).
#: Lookalike models are shared; operation names are ``operations/...`` and owned by the backend.
LENIENT_FIELDS: dict[str, frozenset[str]] = {
    "flashcrowd.audience.v1.GetLookalikeModelRequest": frozenset({"name"}),
    "google.longrunning.GetOperationRequest": frozenset({"name"}),
    "google.longrunning.ListOperationsRequest": frozenset({"name"}),
    "google.longrunning.DeleteOperationRequest": frozenset({"name"}),
    "google.longrunning.CancelOperationRequest": frozenset({"name"}),
    "google.longrunning.WaitOperationRequest": frozenset({"name"}),
}


@dataclass(frozen=True)
class ResourcePlan:
    """Where to look in one message type: resource string fields and nested messages to descend."""

    strict: tuple[descriptor.FieldDescriptor, ...]
    lenient: tuple[descriptor.FieldDescriptor, ...]
    nested: tuple[descriptor.FieldDescriptor, ...]

    @property
    def empty(self) -> bool:
        return not (self.strict or self.lenient or self.nested)


_plans: dict[str, ResourcePlan] = {}


def resource_plan(message_descriptor: descriptor.Descriptor) -> ResourcePlan:
    """The plan of a message type, built once (recursive types such as PackSpec included)."""
    name = message_descriptor.full_name
    plan = _plans.get(name)
    if plan is not None:
        return plan
    # Placeholder first so that recursion (PackSpec -> SetOperands -> PackSpec) terminates.
    _plans[name] = ResourcePlan((), (), ())
    lenient_names = LENIENT_FIELDS.get(name, frozenset())
    strict: list[descriptor.FieldDescriptor] = []
    lenient: list[descriptor.FieldDescriptor] = []
    nested: list[descriptor.FieldDescriptor] = []
    for field_descriptor in message_descriptor.fields:
        if field_descriptor.type == descriptor.FieldDescriptor.TYPE_STRING:
            if field_descriptor.name in RESOURCE_FIELDS:
                (lenient if field_descriptor.name in lenient_names else strict).append(field_descriptor)
        elif field_descriptor.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            sub = field_descriptor.message_type
            if sub is None or sub.GetOptions().map_entry or sub.full_name.startswith("google.protobuf."):
                continue
            nested.append(field_descriptor)
    # Drop nested fields whose whole subtree holds nothing to check.
    _plans[name] = ResourcePlan(
        tuple(strict),
        tuple(lenient),
        tuple(f for f in nested if f.message_type is not None and _has_resources(f.message_type, set())),
    )
    return _plans[name]


def _has_resources(message_descriptor: descriptor.Descriptor, seen: set[str]) -> bool:
    if message_descriptor.full_name in seen:
        return False
    seen.add(message_descriptor.full_name)
    for field_descriptor in message_descriptor.fields:
        if field_descriptor.type == descriptor.FieldDescriptor.TYPE_STRING:
            if field_descriptor.name in RESOURCE_FIELDS:
                return True
        elif field_descriptor.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            sub = field_descriptor.message_type
            if sub is None or sub.GetOptions().map_entry or sub.full_name.startswith("google.protobuf."):
                continue
            if _has_resources(sub, seen):
                return True
    return False


def iter_resource_values(message: Message, path: str = "") -> Iterator[tuple[str, str, bool]]:
    """``(field path, value, strict)`` of every non-empty resource string in a parsed request."""
    plan = resource_plan(cast(descriptor.Descriptor, message.DESCRIPTOR))  # upb's is the same API
    for fields, strict in ((plan.strict, True), (plan.lenient, False)):
        for field_descriptor in fields:
            value = getattr(message, field_descriptor.name)
            if is_repeated(field_descriptor):
                for index, item in enumerate(value):
                    if item:
                        yield f"{path}{field_descriptor.name}[{index}]", item, strict
            elif value:
                yield f"{path}{field_descriptor.name}", value, strict
    for field_descriptor in plan.nested:
        if is_repeated(field_descriptor):
            for index, item in enumerate(getattr(message, field_descriptor.name)):
                yield from iter_resource_values(item, f"{path}{field_descriptor.name}[{index}].")
        elif message.HasField(field_descriptor.name):
            yield from iter_resource_values(
                getattr(message, field_descriptor.name), f"{path}{field_descriptor.name}."
            )


def message_of(field_descriptor: descriptor.FieldDescriptor) -> descriptor.Descriptor:
    """The message type of a message field (the descriptor API types it optional)."""
    if field_descriptor.message_type is None:
        raise TypeError(f"{field_descriptor.full_name} is not a message field")
    return field_descriptor.message_type


def is_repeated(field_descriptor: descriptor.FieldDescriptor) -> bool:
    return bool(field_descriptor.is_repeated)  # protobuf >= 6 (pyproject); ``label`` is gone


# --- methods -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodInfo:
    """One RPC the gateway serves."""

    service: str
    name: str
    descriptor: descriptor.MethodDescriptor = field(compare=False, repr=False)
    backend: str
    scopes: frozenset[str]
    idempotent: bool

    @property
    def full(self) -> str:
        """``/pkg.Service/Method``, the gRPC path."""
        return f"/{self.service}/{self.name}"

    @property
    def key(self) -> str:
        """``Service/Method``, the short form used in tables and settings."""
        return f"{self.service.rsplit('.', 1)[-1]}/{self.name}"

    @property
    def client_streaming(self) -> bool:
        return self.descriptor.client_streaming

    @property
    def server_streaming(self) -> bool:
        return self.descriptor.server_streaming

    @property
    def streaming(self) -> bool:
        return self.client_streaming or self.server_streaming

    @cached_property
    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.descriptor.input_type)

    @cached_property
    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.descriptor.output_type)

    @property
    def returns_operation(self) -> bool:
        return self.descriptor.output_type.full_name == "google.longrunning.Operation"

    @cached_property
    def audited(self) -> bool:
        """Admin writes, destructive methods and member-level methods are written to the audit log."""
        return (
            (self.service == GATEWAY_SERVICE and not self.idempotent)
            or self.name.startswith(DESTRUCTIVE_PREFIXES)
            or bool(self.scopes & MEMBER_SCOPES)
        )

    @cached_property
    def checks_resources(self) -> bool:
        return not resource_plan(self.descriptor.input_type).empty

    @cached_property
    def http_rules(self) -> tuple[http_pb2.HttpRule, ...]:
        options = self.descriptor.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            return ()
        rule = options.Extensions[annotations_pb2.http]
        return (rule, *rule.additional_bindings)


def service_descriptor(service: str) -> descriptor.ServiceDescriptor:
    return _FILES[service].services_by_name[service.rsplit(".", 1)[-1]]


def _build() -> dict[str, MethodInfo]:
    methods: dict[str, MethodInfo] = {}
    for service, backend in SERVICES.items():
        for method in service_descriptor(service).methods:
            key = f"{service.rsplit('.', 1)[-1]}/{method.name}"
            if key not in SCOPES:
                raise RuntimeError(f"no scope declared for {key}: add it to services/gateway/catalog.py")
            info = MethodInfo(
                service=service,
                name=method.name,
                descriptor=method,
                backend=backend,
                scopes=SCOPES[key],
                idempotent=key in IDEMPOTENT,
            )
            methods[info.full] = info
    unknown = (set(SCOPES) | IDEMPOTENT) - {info.key for info in methods.values()}
    if unknown:
        raise RuntimeError(f"scope/retry tables name unknown methods: {sorted(unknown)}")
    return methods


#: ``/pkg.Service/Method`` -> MethodInfo for everything the gateway serves.
METHODS: dict[str, MethodInfo] = _build()
#: Services proxied to a backend (and listed by reflection).
PUBLIC_SERVICES: tuple[str, ...] = tuple(SERVICES)


def methods_of(service: str) -> list[MethodInfo]:
    return [info for info in METHODS.values() if info.service == service]


__all__ = [
    "ADMIN",
    "ALL_SCOPES",
    "AUDIENCE",
    "GATEWAY_SERVICE",
    "LOCAL",
    "METHODS",
    "OPERATIONS_SERVICE",
    "PUBLIC_SERVICES",
    "RETARGET",
    "ROUTED",
    "SALE_MONITOR",
    "MethodInfo",
    "is_repeated",
    "iter_resource_values",
    "message_of",
    "methods_of",
    "resource_plan",
    "service_descriptor",
]
