"""SaleMonitorService over a ``SaleMonitor``: GetSaleStats and WatchSale, scoped to the caller's tenant."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
from flashcrowd.retarget.v1 import sale_monitor_pb2, sale_monitor_pb2_grpc
from google.protobuf import timestamp_pb2

from services.monitor.counters import SaleMonitor, SaleScope
from services.runtime import InvalidArgument, NotFound, Unauthenticated
from services.runtime.assertion import caller_of
from services.runtime.tenant_ids import TENANT_ID_RULE, valid_tenant_id

__all__ = ["SERVICE_NAME", "SaleMonitorServicer", "sale_monitor_definition", "tenant_of_parent"]

SERVICE_NAME = sale_monitor_pb2.DESCRIPTOR.services_by_name["SaleMonitorService"].full_name


def _us(ts: timestamp_pb2.Timestamp) -> int:
    return ts.ToMicroseconds()


_PARENT = re.compile(r"tenants/([^/]*)")
TENANT_TYPE = "flashcrowd.dev/Tenant"


def tenant_of_parent(parent: str, context: grpc.aio.ServicerContext | None) -> str:
    """``tenants/{t}`` -> ``t`` if the verified caller may act for ``t``.

    INVALID_ARGUMENT on ``parent`` when it is missing or malformed; NOT_FOUND for another tenant's
    parent (as for any other tenant's resource); UNAUTHENTICATED when a request has no verified
    caller at all (a server without ``backend_interceptors``). A servicer called without a context
    (unit tests) is not checked.
    """
    if not parent:
        raise InvalidArgument("parent", "required (tenants/{tenant})")
    match = _PARENT.fullmatch(parent)
    if match is None or not valid_tenant_id(match.group(1)):
        raise InvalidArgument(
            "parent", f"expected tenants/{{tenant}} ({TENANT_ID_RULE}), got {parent[:120]!r}"
        )
    tenant = match.group(1)
    if context is None:
        return tenant
    caller = caller_of(context)
    if caller is None:
        raise Unauthenticated(
            "sale stats need a verified caller (the gateway's assertion)", reason="GATEWAY_ASSERTION_REQUIRED"
        )
    if not caller.may_act_for(tenant):
        raise NotFound(TENANT_TYPE, parent)
    return tenant


class SaleMonitorServicer(sale_monitor_pb2_grpc.SaleMonitorServiceServicer):
    def __init__(self, monitor: SaleMonitor, *, interval: float = 1.0) -> None:
        self.monitor = monitor
        self.interval = interval

    def _range(self, request, end_us: int | None) -> tuple[int, int]:
        end = end_us if end_us is not None else self.monitor.now_us()
        start = _us(request.start_time) if request.HasField("start_time") else end - 3_600_000_000
        if start >= end:
            raise InvalidArgument("start_time", "must be before end_time")
        return start, end

    async def GetSaleStats(self, request, context):
        tenant = tenant_of_parent(request.parent, context)
        scope = SaleScope.from_pb(request.scope)
        end = _us(request.end_time) if request.HasField("end_time") else None
        start, end = self._range(request, end)
        return self.monitor.stats(scope, start, end, request.group_by, tenant=tenant)

    async def WatchSale(self, request, context) -> AsyncIterator[sale_monitor_pb2.SaleStats]:
        tenant = tenant_of_parent(request.parent, context)
        scope = SaleScope.from_pb(request.scope)
        start, _ = self._range(request, None)
        while True:
            end = max(self.monitor.now_us(), start + 1)
            yield self.monitor.stats(scope, start, end, request.group_by, tenant=tenant)
            await asyncio.sleep(self.interval)


def sale_monitor_definition(monitor: SaleMonitor) -> tuple[list[str], Callable[[grpc.aio.Server], None]]:
    """The service names and the ``register`` of a SaleMonitorServicer over ``monitor``."""
    servicer = SaleMonitorServicer(monitor)
    return [SERVICE_NAME], lambda server: sale_monitor_pb2_grpc.add_SaleMonitorServiceServicer_to_server(
        servicer, server
    )
