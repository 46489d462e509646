"""gRPC servicers: RetargetService and the google.longrunning.Operations view of launches.

Handlers validate (validation.py), call the ledger through ``Database.run`` (repository.py) and
convert rows to protos (convert.py). Domain errors propagate to the runtime's interceptor, which
turns them into google.rpc.Status with ErrorInfo / BadRequest / ResourceInfo / PreconditionFailure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc.aio
from flashcrowd.retarget.v1 import campaign_pb2, coupon_pb2, retarget_service_pb2, retarget_service_pb2_grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2

from services.retarget import convert, report, validation
from services.retarget import domain as d
from services.retarget import repository as repo
from services.retarget.db import UniqueConflict
from services.runtime import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    attributes,
)
from services.runtime.assertion import caller_of, require_platform
from services.runtime.scopes import MEMBERS_READ, MEMBERS_WRITE

if TYPE_CHECKING:
    from services.retarget.server import RetargetApp

logger = logging.getLogger(__name__)

SOLD_OUT_REASONS = (d.OUT_OF_STOCK, d.BUDGET_EXHAUSTED)
#: ListCampaigns parent naming every tenant (AIP-159), for platform principals only.
ALL_TENANTS = "tenants/-"


def _guard(context: grpc.aio.ServicerContext, tenant: str, resource_type: str, name: str) -> None:
    """A caller authenticated for another tenant (the gateway's assertion) sees NOT_FOUND."""
    caller = caller_of(context)
    if caller is not None and not caller.may_act_for(tenant):
        raise NotFound(resource_type, name)


def _guard_parent(context: grpc.aio.ServicerContext, tenant: str) -> None:
    caller = caller_of(context)
    if caller is not None and not caller.may_act_for(tenant):
        raise NotFound("flashcrowd.dev/Tenant", f"tenants/{tenant}")


def _refuse(context: grpc.aio.ServicerContext, error: ServiceError) -> coupon_pb2.Coupon:
    """Answer an expected refusal (sold out, per-user limit) with the same rich status the runtime's
    error interceptor would send, without raising: a raised error makes the tracing interceptor
    format and record a full traceback on the span (~2-3 ms of CPU each), and in a claim burst
    almost every answer is a refusal. The span still gets the status code."""
    status = error.grpc_status()
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)
    return coupon_pb2.Coupon()


class RetargetServicer(retarget_service_pb2_grpc.RetargetServiceServicer):
    def __init__(self, app: RetargetApp) -> None:
        self.app = app
        self.db = app.db
        # (tenant, template_id) -> the exhaustion error: issued counts never decrease, so a
        # sold-out template stays sold out and later claimers are answered without a transaction.
        self._sold_out: dict[tuple[str, str], ResourceExhausted] = {}

    def now(self) -> int:
        return self.app.clock()

    # -- coupon templates --------------------------------------------------------------------

    async def CreateCouponTemplate(
        self, request: retarget_service_pb2.CreateCouponTemplateRequest, context: grpc.aio.ServicerContext
    ) -> coupon_pb2.CouponTemplate:
        spec = validation.template_spec(request)
        _guard_parent(context, spec.tenant)
        row = await self.db.run(repo.create_template, spec, self.now())
        return convert.template_proto(row)

    async def GetCouponTemplate(
        self, request: retarget_service_pb2.GetCouponTemplateRequest, context: grpc.aio.ServicerContext
    ) -> coupon_pb2.CouponTemplate:
        tenant, template_id = validation.template_ref(request.name, "name")
        _guard(context, tenant, d.TEMPLATE_TYPE, request.name)
        row = await self.db.run(repo.get_template, tenant, template_id, write=False)
        return convert.template_proto(row)

    async def ListCouponTemplates(
        self, request: retarget_service_pb2.ListCouponTemplatesRequest, context: grpc.aio.ServicerContext
    ) -> retarget_service_pb2.ListCouponTemplatesResponse:
        tenant = validation.tenant_of_parent(request.parent)
        _guard_parent(context, tenant)
        size = validation.page_size(request.page_size)
        query = {"m": "templates", "t": tenant}
        after = convert.decode_page_token(request.page_token, query) or 0
        rows = await self.db.run(repo.list_templates, tenant, int(after), size + 1, write=False)
        response = retarget_service_pb2.ListCouponTemplatesResponse(
            coupon_templates=[convert.template_proto(row) for row in rows[:size]]
        )
        if len(rows) > size:
            response.next_page_token = convert.encode_page_token(query, rows[size - 1]["id"])
        return response

    # -- campaigns ---------------------------------------------------------------------------

    async def CreateCampaign(
        self, request: retarget_service_pb2.CreateCampaignRequest, context: grpc.aio.ServicerContext
    ) -> campaign_pb2.Campaign:
        spec = validation.campaign_spec(request, self.now())
        _guard_parent(context, spec.tenant)
        size = await self._check_pack(spec.tenant, spec.audience_pack, "campaign.audience_pack")
        row = await self.db.run(
            repo.create_campaign, dataclasses.replace(spec, planned_size=size), self.now()
        )
        return convert.campaign_proto(row)

    async def _check_pack(self, tenant: str, pack: str, field: str) -> int:
        """The pack must exist now (NOT_FOUND otherwise); it may still be building. Its size (0 while
        it builds)."""
        try:
            return (await self.app.audience.get_pack(tenant, pack, field=field)).size
        except FailedPrecondition as error:
            if error.reason != d.PACK_NOT_READY:
                raise
            return 0

    async def GetCampaign(
        self, request: retarget_service_pb2.GetCampaignRequest, context: grpc.aio.ServicerContext
    ) -> campaign_pb2.Campaign:
        tenant, campaign_id = validation.campaign_ref(request.name)
        _guard(context, tenant, d.CAMPAIGN_TYPE, request.name)
        row = await self.db.run(repo.get_campaign, tenant, campaign_id, write=False)
        return convert.campaign_proto(row)

    async def ListCampaigns(
        self, request: retarget_service_pb2.ListCampaignsRequest, context: grpc.aio.ServicerContext
    ) -> retarget_service_pb2.ListCampaignsResponse:
        tenant: str | None
        if request.parent == ALL_TENANTS:
            # AIP-159: every tenant's campaigns, for platform principals (the sale monitor's rules).
            caller = caller_of(context)
            if caller is not None and not caller.is_platform:
                raise NotFound("flashcrowd.dev/Tenant", ALL_TENANTS)
            tenant = None
        else:
            tenant = validation.tenant_of_parent(request.parent)
            _guard_parent(context, tenant)
        size = validation.page_size(request.page_size)
        state = None
        text = request.filter.replace(" ", "")
        if text:
            field, _, value = text.partition("=")
            state = convert.STATE_FILTERS.get(value.upper()) if field == "state" else None
            if state is None:
                raise InvalidArgument("filter", "supported: state=DRAFT|RUNNING|PAUSED|COMPLETED|CANCELLED")
        query = {"m": "campaigns", "t": tenant, "s": state}
        after = convert.decode_page_token(request.page_token, query)
        key = (int(after[0]), int(after[1])) if after else None
        rows = await self.db.run(repo.list_campaigns, tenant, state, key, size + 1, write=False)
        response = retarget_service_pb2.ListCampaignsResponse(
            campaigns=[convert.campaign_proto(row) for row in rows[:size]]
        )
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = convert.encode_page_token(query, [last["create_us"], last["id"]])
        return response

    async def LaunchCampaign(
        self, request: retarget_service_pb2.LaunchCampaignRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.Operation:
        tenant, campaign_id = validation.campaign_ref(request.name)
        _guard(context, tenant, d.CAMPAIGN_TYPE, request.name)
        row = await self.db.run(repo.get_campaign, tenant, campaign_id, write=False)
        if row["state"] == d.DRAFT:
            pack = await self.app.audience.get_pack(tenant, row["audience_pack"])
            caller = caller_of(context)
            minimum = self.app.settings.min_targetable_pack_size
            if caller is not None and not caller.is_platform and pack.size < minimum:
                raise FailedPrecondition(
                    "PACK_TOO_SMALL",
                    f"{row['audience_pack']} has fewer than {minimum} members: too small to target "
                    "(a report on it could single people out); widen the pack",
                    [("PACK_TOO_SMALL", row["audience_pack"], f"fewer than {minimum} members")],
                )
            row, started = await self.db.run(
                repo.start_launch, tenant, campaign_id, pack.version, pack.size, self.now()
            )
            if started:
                logger.info(
                    "launch started",
                    extra={
                        attributes.CAMPAIGN_NAME: request.name,
                        "pack_version": pack.version,
                        "audience_size": pack.size,
                    },
                )
        elif row["state"] not in (d.RUNNING, d.COMPLETED):
            raise repo.state_conflict(row, "launch")
        if row["state"] == d.RUNNING:
            self.app.launcher.ensure(row["id"])
        return convert.launch_operation(row)

    async def PauseCampaign(
        self, request: retarget_service_pb2.PauseCampaignRequest, context: grpc.aio.ServicerContext
    ) -> campaign_pb2.Campaign:
        tenant, campaign_id = validation.campaign_ref(request.name)
        _guard(context, tenant, d.CAMPAIGN_TYPE, request.name)
        violations: list[tuple[str, str]] = []
        if len(request.reason) > validation.MAX_TEXT:
            violations.append(("reason", f"must be at most {validation.MAX_TEXT} characters"))
        firing = validation.rule_firing(violations, request, self.now())
        if violations:
            raise InvalidArgument(violations)
        async with self._firing_refusals(tenant, campaign_id, firing):
            row = await self.db.run(
                repo.pause_campaign, tenant, campaign_id, request.reason, self.now(), firing
            )
        return convert.campaign_proto(row)

    async def UpdateCampaign(
        self, request: retarget_service_pb2.UpdateCampaignRequest, context: grpc.aio.ServicerContext
    ) -> campaign_pb2.Campaign:
        if request.HasField("campaign") and request.campaign.name:
            tenant, _ = validation.campaign_ref(request.campaign.name, "campaign.name")
            _guard(context, tenant, d.CAMPAIGN_TYPE, request.campaign.name)
        update = validation.campaign_update(request, self.now())
        async with self._firing_refusals(update.tenant, update.campaign_id, update.firing):
            row = await self.db.run(repo.update_campaign, update, self.now())
        return convert.campaign_proto(row)

    @contextlib.asynccontextmanager
    async def _firing_refusals(self, tenant: str, campaign_id: str, firing: dict | None):
        """A rule firing whose action the ledger refused (state conflict, copy already made) is
        still audited on the campaign, with the refusal as its outcome (the action's transaction
        rolled back, so this is a transaction of its own)."""
        try:
            yield
        except (FailedPrecondition, AlreadyExists) as error:
            if firing is not None:
                outcome = f"no-op ({error.code.name}): {error.message}"

                def record(tx: repo.Tx) -> None:
                    campaign = repo.get_campaign(tx, tenant, campaign_id)
                    repo.record_firing(tx, campaign, firing, outcome, self.now())

                with contextlib.suppress(ServiceError):
                    await self.db.run(record)
            raise

    async def ResumeCampaign(
        self, request: retarget_service_pb2.ResumeCampaignRequest, context: grpc.aio.ServicerContext
    ) -> campaign_pb2.Campaign:
        tenant, campaign_id = validation.campaign_ref(request.name)
        _guard(context, tenant, d.CAMPAIGN_TYPE, request.name)
        row = await self.db.run(repo.resume_campaign, tenant, campaign_id, self.now())
        if row["state"] == d.RUNNING:
            self.app.launcher.ensure(row["id"])
        return convert.campaign_proto(row)

    async def CancelCampaign(
        self, request: retarget_service_pb2.CancelCampaignRequest, context: grpc.aio.ServicerContext
    ) -> campaign_pb2.Campaign:
        tenant, campaign_id = validation.campaign_ref(request.name)
        _guard(context, tenant, d.CAMPAIGN_TYPE, request.name)
        row, _ = await self.db.run(repo.cancel_campaign, tenant, campaign_id, self.now())
        return convert.campaign_proto(row)

    async def CopyCampaign(
        self, request: retarget_service_pb2.CopyCampaignRequest, context: grpc.aio.ServicerContext
    ) -> campaign_pb2.Campaign:
        tenant, campaign_id = validation.campaign_ref(request.name)
        _guard(context, tenant, d.CAMPAIGN_TYPE, request.name)
        violations: list[tuple[str, str]] = []
        if not d.valid_id(request.campaign_id):
            violations.append(("campaign_id", "must match [a-z]([a-z0-9-]{0,61}[a-z0-9])?"))
        firing = validation.rule_firing(violations, request, self.now())
        if violations:
            raise InvalidArgument(violations)
        pack = validation.pack_ref(request.audience_pack, tenant, "audience_pack")
        await self.db.run(repo.get_campaign, tenant, campaign_id, write=False)
        await self._check_pack(tenant, pack, "audience_pack")
        async with self._firing_refusals(tenant, campaign_id, firing):
            row = await self.db.run(
                repo.copy_campaign, tenant, campaign_id, request.campaign_id, pack, self.now(), firing
            )
        return convert.campaign_proto(row)

    # -- coupons -----------------------------------------------------------------------------

    async def ClaimCoupon(
        self, request: retarget_service_pb2.ClaimCouponRequest, context: grpc.aio.ServicerContext
    ) -> coupon_pb2.Coupon:
        require_platform(context, MEMBERS_WRITE)
        tenant, template_id = validation.template_ref(request.coupon_template, "coupon_template")
        _guard(context, tenant, d.TEMPLATE_TYPE, request.coupon_template)
        user_id = validation.user_id(request.user_id)
        campaign_id = ""
        if request.campaign:
            owner, campaign_id = validation.campaign_ref(request.campaign, "campaign")
            if owner != tenant:
                raise NotFound(d.CAMPAIGN_TYPE, request.campaign, metadata={"field": "campaign"})
        violations: list[tuple[str, str]] = []
        validation.key(violations, "request_id", request.request_id, required=False)
        if violations:
            raise InvalidArgument(violations)
        key = (tenant, template_id)
        sold_out = self._sold_out.get(key)
        if sold_out is not None and not campaign_id:
            # Members' delivered coupons need no stock; anyone else is refused without a write.
            if request.request_id:
                prior = await self.db.run(
                    repo.find_claim,
                    tenant=tenant,
                    template_id=template_id,
                    user_id=user_id,
                    campaign_id=campaign_id,
                    request_id=request.request_id,
                    write=False,
                )
                if prior is not None:
                    return convert.coupon_proto(prior, self.now())
            refusal = ResourceExhausted(
                sold_out.message,
                reason=sold_out.reason,
                violations=sold_out.violations,
                metadata=sold_out.metadata,
            )
            return _refuse(context, refusal)
        try:
            row, _ = await self.db.run(
                repo.claim_coupon,
                tenant=tenant,
                template_id=template_id,
                user_id=user_id,
                campaign_id=campaign_id,
                request_id=request.request_id,
                now=self.now(),
                conflict_retries=8,
            )
        except UniqueConflict:
            raise Aborted(
                "concurrent claims for the same user collided; retry", retry_after_seconds=0.05
            ) from None
        except ResourceExhausted as error:
            if error.reason in SOLD_OUT_REASONS:
                self._sold_out[key] = error
            return _refuse(context, error)
        return convert.coupon_proto(row, self.now())

    async def RedeemCoupon(
        self, request: retarget_service_pb2.RedeemCouponRequest, context: grpc.aio.ServicerContext
    ) -> retarget_service_pb2.RedeemCouponResponse:
        require_platform(context, MEMBERS_WRITE)
        now = self.now()
        redeem = validation.redeem_request(request, now)
        _guard(context, redeem.tenant, d.COUPON_TYPE, request.coupon)
        result, replayed = await self.db.run(repo.redeem_coupon, redeem, now)
        if not replayed:
            self.app.count_redeemed()
        return convert.redeem_response(result, replayed, now)

    async def RefundRedemption(
        self, request: retarget_service_pb2.RefundRedemptionRequest, context: grpc.aio.ServicerContext
    ) -> coupon_pb2.Coupon:
        require_platform(context, MEMBERS_WRITE)
        tenant, coupon_id = validation.coupon_ref(request.coupon)
        _guard(context, tenant, d.COUPON_TYPE, request.coupon)
        violations: list[tuple[str, str]] = []
        validation.key(violations, "order_id", request.order_id, required=True)
        validation.key(violations, "idempotency_key", request.idempotency_key, required=True)
        if violations:
            raise InvalidArgument(violations)
        now = self.now()
        result, _ = await self.db.run(
            repo.refund_redemption,
            tenant=tenant,
            coupon_id=coupon_id,
            order_id=request.order_id,
            idempotency_key=request.idempotency_key,
            now=now,
        )
        return convert.coupon_proto(result["coupon"], now)

    # -- offers and reports ------------------------------------------------------------------

    async def StreamOffers(
        self, request: retarget_service_pb2.StreamOffersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[retarget_service_pb2.Offer]:
        require_platform(context, MEMBERS_READ)
        tenant = validation.tenant_of_parent(request.parent)
        _guard_parent(context, tenant)
        campaign_pk = None
        if request.campaign:
            owner, campaign_id = validation.campaign_ref(request.campaign, "campaign")
            if owner != tenant:
                raise NotFound(d.CAMPAIGN_TYPE, request.campaign, metadata={"field": "campaign"})
            campaign_pk = (
                await self.db.run(repo.get_campaign, tenant, campaign_id, field="campaign", write=False)
            )["id"]
        if request.cursor and not (
            request.cursor.isascii() and request.cursor.isdigit() and len(request.cursor) < 19
        ):
            raise InvalidArgument("cursor", "must be a cursor returned by a previous Offer")
        after = int(request.cursor or 0)
        settings = self.app.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.stream_follow_max_seconds
        while True:
            signal = self.app.delivered_signal
            rows = await self.db.run(
                repo.read_outbox, tenant, campaign_pk, after, settings.stream_batch_size, write=False
            )
            for row in rows:
                after = row["id"]
                offer = retarget_service_pb2.Offer(
                    cursor=str(row["id"]),
                    campaign=d.campaign_name(tenant, row["campaign_id"]),
                    arm_id=row["arm_id"],
                    user_id=row["user_id"],
                    coupon=d.coupon_name(tenant, row["coupon_id"]),
                    item_ids=convert.json.loads(row["offer_item_ids"]),
                )
                offer.create_time.FromMicroseconds(row["create_us"])
                yield offer
            if len(rows) == settings.stream_batch_size:
                continue
            remaining = deadline - loop.time()
            if not request.follow or remaining <= 0 or context.done():
                return
            # Woken by this process's launches at once; other writers are seen at the next poll.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signal.wait(), timeout=min(settings.stream_poll_seconds, remaining))

    async def GetCampaignReport(
        self, request: retarget_service_pb2.GetCampaignReportRequest, context: grpc.aio.ServicerContext
    ) -> campaign_pb2.CampaignReport:
        tenant, campaign_id = validation.campaign_ref(request.campaign, "campaign")
        _guard(context, tenant, d.CAMPAIGN_TYPE, request.campaign)
        now = self.now()

        def read(tx: repo.Tx) -> tuple[repo.CampaignFacts, list[dict]]:
            campaign = repo.get_campaign(tx, tenant, campaign_id, field="campaign")
            firings = repo.rule_firings(tx, tenant, d.campaign_name(tenant, campaign_id))
            return repo.campaign_facts(tx, campaign, now), firings

        facts, firings = await self.db.run(read, write=False)
        out = report.campaign_report(facts, request.campaign)
        out.rule_firings.extend(convert.rule_firing_proto(firing) for firing in firings)
        return out


class LaunchOperationsServicer(operations_pb2_grpc.OperationsServicer):
    """``google.longrunning.Operations`` for launch operations, read from the ledger (so an
    operation outlives the process that started it)."""

    def __init__(self, app: RetargetApp) -> None:
        self.app = app

    async def _operation(self, name: str, context: grpc.aio.ServicerContext) -> operations_pb2.Operation:
        parsed = d.parse_operation_name(name)
        if parsed is None:
            raise InvalidArgument("name", "must be tenants/{tenant}/campaigns/{campaign}/operations/launch")
        tenant, campaign_id = parsed
        _guard(context, tenant, d.OPERATION_TYPE, name)
        row = await self.app.db.run(repo.get_campaign, tenant, campaign_id, write=False)
        if row["state"] == d.DRAFT:
            raise NotFound(d.OPERATION_TYPE, name)
        return convert.launch_operation(row)

    async def GetOperation(
        self, request: operations_pb2.GetOperationRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.Operation:
        return await self._operation(request.name, context)

    async def WaitOperation(
        self, request: operations_pb2.WaitOperationRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.Operation:
        timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 60.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(timeout, 0.0), 600.0)
        while True:
            operation = await self._operation(request.name, context)
            if operation.done or loop.time() >= deadline:
                return operation
            await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))

    async def ListOperations(
        self, request: operations_pb2.ListOperationsRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.ListOperationsResponse:
        """The tenant's launch operations, newest first; ``filter``: ``done=true`` / ``done=false``."""
        name = request.name.removesuffix("/operations")
        tenant = d.parse_parent(name)
        if tenant is None:
            raise InvalidArgument("name", "must be tenants/{tenant} (or tenants/{tenant}/operations)")
        _guard_parent(context, tenant)
        size = validation.page_size(request.page_size)
        text = request.filter.replace(" ", "").lower()
        if text not in ("", "done=true", "done=false"):
            raise InvalidArgument("filter", "supported: done=true, done=false")
        done = None if not text else text == "done=true"
        query = {"m": "launches", "t": tenant, "d": done}
        after = convert.decode_page_token(request.page_token, query)
        key = (int(after[0]), int(after[1])) if after else None
        response = operations_pb2.ListOperationsResponse()
        more = False
        # ``done`` derives from state and launch error, so it is filtered on the rows read.
        while True:
            rows = await self.app.db.run(
                repo.list_campaigns, tenant, None, key, size + 1, launched=True, write=False
            )
            page = rows[:size]
            for index, row in enumerate(page):
                key = (int(row["create_us"]), int(row["id"]))
                operation = convert.launch_operation(row)
                if done is None or operation.done == done:
                    response.operations.append(operation)
                    if len(response.operations) == size:
                        more = index < len(page) - 1 or len(rows) > size
                        break
            else:
                if len(rows) > size:
                    continue  # every row of this batch was filtered out: read on
            break
        if more and key is not None:
            response.next_page_token = convert.encode_page_token(query, list(key))
        return response

    async def DeleteOperation(
        self, request: operations_pb2.DeleteOperationRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        raise FailedPrecondition(
            "NOT_SUPPORTED", "launch operations are part of the campaign; cancel the campaign"
        )
