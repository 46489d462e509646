"""Hypothesis strategies built from proto descriptors: any request message of any served method.

Fields are set at random (each with probability ~1/2), with values that stress validation: integers at
and beyond the usual ranges (negative, huge), NaN/inf doubles, unknown enum numbers, odd strings,
nested specs a few levels deep. Resource-name fields mostly name the caller's own resources (so the
request reaches the backend and fuzzes its validation too), sometimes another tenant's or garbage.
"""

from __future__ import annotations

from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message
from hypothesis import strategies as st

from services.gateway.catalog import RESOURCE_FIELDS

FD = descriptor.FieldDescriptor
MAX_DEPTH = 4

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, 0, 1, -1, 2**31 - 1, 2**32, -(2**31), 10_000, 10_001) if low <= v <= high]
    return st.one_of(
        st.sampled_from(edges), st.integers(low, high), st.integers(max(low, -5), min(high, 5000))
    )


def resource_names(tenant: str) -> st.SearchStrategy[str]:
    own = f"tenants/{tenant}"
    ids = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
    return st.one_of(
        st.just(own),
        ids.map(lambda i: f"{own}/packs/{i}"),
        ids.map(lambda i: f"{own}/campaigns/{i}"),
        ids.map(lambda i: f"{own}/couponTemplates/{i}"),
        ids.map(lambda i: f"{own}/coupons/{i}"),
        ids.map(lambda i: f"{own}/operations/{i}"),
        ids.map(lambda i: f"{own}/campaigns/{i}/operations/launch"),
        st.sampled_from(["tenants/other/packs/p1", "tenants/", "tenants//packs/x", f"{own}/packs/", "", "x"]),
        st.text(max_size=30),
    )


def _scalar(field: FD, tenant: str) -> st.SearchStrategy[object]:
    kind = field.type
    if kind in _INT_RANGES:
        return _ints(*_INT_RANGES[kind])
    if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        floats = st.floats(allow_nan=True, allow_infinity=True, width=64 if kind == FD.TYPE_DOUBLE else 32)
        return st.one_of(floats, st.sampled_from([0.0, 0.01, 0.05, 0.1, 1.0, -1.0]))
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_STRING:
        if field.name in RESOURCE_FIELDS:
            return resource_names(tenant)
        return st.one_of(
            st.text(max_size=40),
            st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
            st.sampled_from(["", "a" * 300, "state=READY", "labels.a=b AND state=READY", "\x00", "é€😀"]),
        )
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=40)
    if kind == FD.TYPE_ENUM:
        numbers = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.sampled_from([max(numbers) + 1, 99, -1]))
    raise AssertionError(f"unexpected field type {kind}")


@st.composite
def messages(
    draw: st.DrawFn, message_descriptor: descriptor.Descriptor, tenant: str, depth: int = 0
) -> Message:
    """A message of ``message_descriptor`` with random fields set."""
    message = message_factory.GetMessageClass(message_descriptor)()
    if depth > MAX_DEPTH:
        return message
    for field in message_descriptor.fields:
        if not draw(st.booleans()):
            continue
        repeated = field.is_repeated
        if field.type == FD.TYPE_MESSAGE:
            sub = field.message_type
            if sub.GetOptions().map_entry:
                key = _scalar(sub.fields_by_name["key"], tenant)
                value_field = sub.fields_by_name["value"]
                values = (
                    messages(value_field.message_type, tenant, depth + 1)
                    if value_field.type == FD.TYPE_MESSAGE
                    else _scalar(value_field, tenant)
                )
                target = getattr(message, field.name)
                for k, v in draw(st.dictionaries(key, values, max_size=3)).items():
                    if value_field.type == FD.TYPE_MESSAGE:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
                continue
            if repeated:
                items = draw(st.lists(messages(sub, tenant, depth + 1), max_size=3))
                getattr(message, field.name).extend(items)
            else:
                getattr(message, field.name).CopyFrom(draw(messages(sub, tenant, depth + 1)))
            continue
        values = _scalar(field, tenant)
        if repeated:
            getattr(message, field.name).extend(draw(st.lists(values, max_size=4)))
        else:
            setattr(message, field.name, draw(values))
    return message
