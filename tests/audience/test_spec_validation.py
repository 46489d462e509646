"""Every class of bad spec gets INVALID_ARGUMENT with the full field path; all violations at once."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from flashcrowd.audience.v1 import spec_pb2
from google.protobuf import json_format

from services.audience.spec_validation import MAX_DEPTH, validate_spec, violations
from services.runtime.errors import InvalidArgument

WINDOW = {"absolute": {"startTime": "2025-06-12T00:00:00Z", "endTime": "2025-06-13T00:00:00Z"}}
CLICKS = {"behavior": {"eventTypes": ["EVENT_TYPE_CLICK"], "window": WINDOW}}


def spec(data: dict[str, Any]) -> spec_pb2.PackSpec:
    return json_format.ParseDict(data, spec_pb2.PackSpec())


def fields(data: dict[str, Any], options: spec_pb2.BuildOptions | None = None) -> dict[str, str]:
    return dict(violations(spec(data), options))


def test_valid_spec_passes() -> None:
    validate_spec(
        spec(
            {
                "exclude": {
                    "base": {
                        "union": {
                            "operands": [
                                CLICKS,
                                {"shortcut": {"kind": "KIND_VIDEO_VIEWERS", "window": {"last": "259200s"}}},
                            ]
                        }
                    },
                    "subtract": [
                        {
                            "shortcut": {
                                "kind": "KIND_PURCHASERS",
                                "window": WINDOW,
                                "filter": {"amount": {"minFen": 100}},
                            }
                        },
                        {
                            "profile": {
                                "genders": ["GENDER_MALE"],
                                "regions": ["CN-GD"],
                                "interests": ["deals"],
                            }
                        },
                        {"pack": {"pack": "tenants/acme/packs/seed-1", "version": 3}},
                    ],
                }
            }
        ),
        spec_pb2.BuildOptions(include_bots=True),
    )


def test_error_is_invalid_argument_with_bad_request_details() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_spec(spec_pb2.PackSpec(), None)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violations == [("pack.spec", error.violations[0][1])]
    assert "empty spec" in error.violations[0][1]


def test_window_end_before_start_names_the_deep_field() -> None:
    bad = {"absolute": {"startTime": "2025-06-13T00:00:00Z", "endTime": "2025-06-12T00:00:00Z"}}
    found = fields(
        {
            "exclude": {
                "base": CLICKS,
                "subtract": [{"behavior": {"eventTypes": ["EVENT_TYPE_PAY"], "window": bad}}],
            }
        }
    )
    assert list(found) == ["pack.spec.exclude.subtract[0].behavior.window.absolute.end_time"]
    assert (
        "must be after start_time" in found["pack.spec.exclude.subtract[0].behavior.window.absolute.end_time"]
    )
    same = {"absolute": {"startTime": "2025-06-13T00:00:00Z", "endTime": "2025-06-13T00:00:00Z"}}
    assert "pack.spec.behavior.window.absolute.end_time" in fields(
        {"behavior": {"eventTypes": [5], "window": same}}
    )


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({}, "pack.spec", "empty spec"),
        ({"union": {"operands": [CLICKS]}}, "pack.spec.union.operands", "at least 2"),
        ({"intersect": {}}, "pack.spec.intersect.operands", "at least 2"),
        ({"exclude": {"subtract": [CLICKS]}}, "pack.spec.exclude.base", "required"),
        ({"exclude": {"base": CLICKS}}, "pack.spec.exclude.subtract", "at least one"),
        ({"behavior": {"window": WINDOW}}, "pack.spec.behavior.event_types", "at least one"),
        (
            {"behavior": {"eventTypes": [0], "window": WINDOW}},
            "pack.spec.behavior.event_types[0]",
            "unspecified",
        ),
        (
            {"behavior": {"eventTypes": [5, 99], "window": WINDOW}},
            "pack.spec.behavior.event_types[1]",
            "unknown",
        ),
        ({"behavior": {"eventTypes": [5]}}, "pack.spec.behavior.window", "required"),
        ({"behavior": {"eventTypes": [5], "window": {}}}, "pack.spec.behavior.window", "required"),
        (
            {"behavior": {"eventTypes": [5], "window": {"absolute": {"endTime": "2025-06-13T00:00:00Z"}}}},
            "pack.spec.behavior.window.absolute.start_time",
            "required",
        ),
        (
            {"behavior": {"eventTypes": [5], "window": {"last": "-3600s"}}},
            "pack.spec.behavior.window.last",
            "positive",
        ),
        (
            {"behavior": {"eventTypes": [5], "window": {"last": "0s"}}},
            "pack.spec.behavior.window.last",
            "positive",
        ),
        (
            {"behavior": {"eventTypes": [5], "window": WINDOW, "minCount": -1}},
            "pack.spec.behavior.min_count",
            ">= 0",
        ),
        (
            {
                "behavior": {
                    "eventTypes": [8],
                    "window": WINDOW,
                    "filter": {"amount": {"minFen": 500, "maxFen": 100}},
                }
            },
            "pack.spec.behavior.filter.amount",
            "greater than max_fen",
        ),
        (
            {"behavior": {"eventTypes": [8], "window": WINDOW, "filter": {"amount": {"minFen": -5}}}},
            "pack.spec.behavior.filter.amount.min_fen",
            ">= 0",
        ),
        (
            {"behavior": {"eventTypes": [5], "window": WINDOW, "filter": {"itemIds": [0]}}},
            "pack.spec.behavior.filter.item_ids[0]",
            "not an id",
        ),
        ({"profile": {}}, "pack.spec.profile", "empty profile filter"),
        ({"profile": {"ageBands": [0]}}, "pack.spec.profile.age_bands[0]", "unspecified"),
        ({"profile": {"ageBands": [42]}}, "pack.spec.profile.age_bands[0]", "unknown"),
        ({"profile": {"genders": [0]}}, "pack.spec.profile.genders[0]", "unspecified"),
        (
            {"profile": {"interests": ["deals", "yachts"]}},
            "pack.spec.profile.interests[1]",
            "unknown interest",
        ),
        ({"profile": {"regions": ["guangdong"]}}, "pack.spec.profile.regions[0]", "malformed region"),
        ({"profile": {"regions": ["US-CA"]}}, "pack.spec.profile.regions[0]", "unknown region"),
        ({"pack": {"pack": "packs/x"}}, "pack.spec.pack.pack", "malformed pack name"),
        ({"pack": {"pack": "tenants/Acme/packs/x"}}, "pack.spec.pack.pack", "tenant id"),
        ({"pack": {"pack": "tenants/acme/packs/9x"}}, "pack.spec.pack.pack", "pack id"),
        ({"pack": {"pack": "tenants/acme/packs/x", "version": "-1"}}, "pack.spec.pack.version", ">= 0"),
        ({"shortcut": {"window": WINDOW}}, "pack.spec.shortcut.kind", "unspecified"),
        ({"shortcut": {"kind": "KIND_CLICKERS"}}, "pack.spec.shortcut.window", "required"),
        # Contradictions that make the result empty whatever the data.
        (
            {
                "intersect": {
                    "operands": [
                        {"profile": {"genders": ["GENDER_MALE"]}},
                        {"profile": {"genders": ["GENDER_FEMALE"]}},
                    ]
                }
            },
            "pack.spec.intersect.operands",
            "disjoint genders",
        ),
        (
            {
                "intersect": {
                    "operands": [
                        CLICKS,
                        {
                            "intersect": {
                                "operands": [
                                    {"profile": {"ageBands": [2]}},
                                    {"profile": {"ageBands": [3, 4]}},
                                ]
                            }
                        },
                    ]
                }
            },
            "pack.spec.intersect.operands",
            "disjoint age_bands",
        ),
        ({"exclude": {"base": CLICKS, "subtract": [CLICKS]}}, "pack.spec.exclude.subtract[0]", "same spec"),
        (
            {
                "intersect": {
                    "operands": [
                        CLICKS,
                        {"exclude": {"base": {"profile": {"genders": [1]}}, "subtract": [CLICKS]}},
                    ]
                }
            },
            "pack.spec.intersect.operands",
            "subtracts",
        ),
        (
            {"behavior": {"eventTypes": [5], "window": WINDOW, "filter": {"amount": {"minFen": 100}}}},
            "pack.spec.behavior.filter.amount",
            "carries an amount",
        ),
        (
            {"shortcut": {"kind": "KIND_CLICKERS", "window": WINDOW, "filter": {"amount": {"maxFen": 100}}}},
            "pack.spec.shortcut.filter.amount",
            "only the purchasers",
        ),
    ],
)
def test_bad_input_classes(data: dict[str, Any], field: str, words: str) -> None:
    found = fields(data)
    assert field in found, found
    assert words in found[field]


def test_every_violation_is_reported_at_once() -> None:
    data = {
        "union": {
            "operands": [
                {"behavior": {"eventTypes": [0], "minCount": -2}},
                {"profile": {"regions": ["nowhere"]}},
                {},
            ]
        }
    }
    assert list(fields(data)) == [
        "pack.spec.union.operands[0].behavior.event_types[0]",
        "pack.spec.union.operands[0].behavior.window",
        "pack.spec.union.operands[0].behavior.min_count",
        "pack.spec.union.operands[1].profile.regions[0]",
        "pack.spec.union.operands[2]",
    ]


def test_depth_limit() -> None:
    node: dict[str, Any] = CLICKS
    for _ in range(MAX_DEPTH):
        node = {"union": {"operands": [node, CLICKS]}}
    found = fields(node)
    assert len(found) == 1
    (field, description), *_ = found.items()
    assert field.startswith("pack.spec.union.operands[0]") and f"deeper than {MAX_DEPTH}" in description
    ok = CLICKS
    for _ in range(MAX_DEPTH - 1):
        ok = {"union": {"operands": [ok, CLICKS]}}
    assert fields(ok) == {}


def test_options_and_custom_field_prefix() -> None:
    options = spec_pb2.BuildOptions()
    options.as_of.seconds = 10**13  # beyond year 9999
    found = dict(violations(spec(CLICKS), options, field="spec"))
    assert list(found) == ["options.as_of"]
    found = dict(violations(spec({}), None, field="request.pack.spec"))
    assert list(found) == ["request.pack.spec"]
