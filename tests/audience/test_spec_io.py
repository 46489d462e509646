"""Spec files: friendly YAML/JSON in, canonical protobuf JSON out, errors with field and line."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from flashcrowd.audience.v1 import spec_pb2

from services.audience.spec_io import (
    PackDocument,
    SpecFormatError,
    dump_document,
    dump_spec,
    parse_document,
    parse_spec,
    read_document,
    with_lines,
    write_document,
)
from services.audience.spec_validation import validate_spec
from services.runtime.errors import InvalidArgument

DOC = """\
displayName: Clicked in the sale hour, did not buy
labels: {campaign: 618, owner: growth}
spec:
  exclude:
    base:
      shortcut:
        kind: clickers
        window: {absolute: {startTime: 2025-06-13T02:00:00Z, endTime: "2025-06-13T03:00:00+00:00"}}
    subtract:
      - shortcut: {kind: purchasers, window: {last: 1h30m}}
      - behavior:
          event_types: [pay, EVENT_TYPE_ORDER, 6]
          window: {last: 3d}
          minCount: 2
          filter: {categoryIds: [1, 2], amount: {minFen: 100}}
      - profile: {genders: [female], ageBands: [25_30, 31-35], regions: [CN-GD], interests: [deals]}
options: {includeBots: true, asOf: 2025-06-15}
ttl: 30d
"""


def test_friendly_yaml_document() -> None:
    doc = parse_document(DOC)
    assert doc.display_name == "Clicked in the sale hour, did not buy"
    assert doc.labels == {"campaign": "618", "owner": "growth"}
    assert doc.ttl is not None and doc.ttl.ToTimedelta() == timedelta(days=30)
    assert doc.options.include_bots and doc.options.as_of.ToJsonString() == "2025-06-15T00:00:00Z"
    spec = doc.spec
    base = spec.exclude.base.shortcut
    assert base.kind == spec_pb2.Shortcut.KIND_CLICKERS
    assert base.window.absolute.end_time.ToJsonString() == "2025-06-13T03:00:00Z"
    assert spec.exclude.subtract[0].shortcut.window.last.ToTimedelta() == timedelta(hours=1, minutes=30)
    behavior = spec.exclude.subtract[1].behavior
    assert list(behavior.event_types) == [8, 7, 6] and behavior.min_count == 2
    assert behavior.window.last.ToTimedelta() == timedelta(days=3)
    assert behavior.filter.amount.min_fen == 100 and list(behavior.filter.category_ids) == [1, 2]
    profile = spec.exclude.subtract[2].profile
    assert list(profile.age_bands) == [spec_pb2.AGE_BAND_25_30, spec_pb2.AGE_BAND_31_35]
    assert list(profile.genders) == [spec_pb2.GENDER_FEMALE]
    validate_spec(spec, doc.options, field="spec")


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_round_trip(fmt: str, tmp_path: Path) -> None:
    doc = parse_document(DOC)
    again = parse_document(dump_document(doc, fmt), fmt=fmt)
    assert (again.spec, again.options, again.ttl, again.labels, again.display_name) == (
        doc.spec,
        doc.options,
        doc.ttl,
        doc.labels,
        doc.display_name,
    )
    path = tmp_path / f"spec.{fmt}"
    write_document(path, doc)
    assert read_document(path).spec == doc.spec
    assert parse_spec(dump_spec(doc.spec, fmt), fmt=fmt) == doc.spec


def test_bare_spec_and_json() -> None:
    spec = parse_spec('{"shortcut": {"kind": "KIND_FOLLOWERS", "window": {"last": "3600s"}}}')
    assert spec.shortcut.kind == spec_pb2.Shortcut.KIND_FOLLOWERS
    doc = parse_document("profile: {genders: [male]}\n")
    assert list(doc.spec.profile.genders) == [spec_pb2.GENDER_MALE] and doc.display_name == ""


def violations(text: str, fmt: str | None = None) -> dict[str, str]:
    with pytest.raises(SpecFormatError) as caught:
        parse_document(text, fmt=fmt)
    assert isinstance(caught.value, InvalidArgument)
    return dict(caught.value.violations)


def test_errors_name_field_and_line() -> None:
    text = """\
spec:
  union:
    operands:
      - behavior:
          eventTypes: [click, clik]
          window: {lst: 3h}
      - shortcut: {kind: purchasers, window: {last: 3x}}
      - behavior: {eventTypes: [pay], minCount: lots, window: {absolute: {startTime: yesterday}}}
      - profile: {genders: [female]}
        shortcut: {kind: clickers}
"""
    found = violations(text)
    assert found["spec.union.operands[0].behavior.event_types[1]"].startswith(
        "line 5: unknown EventType 'clik'"
    )
    assert found["spec.union.operands[0].behavior.window.lst"].startswith(
        "line 6: unknown field of TimeWindow"
    )
    assert found["spec.union.operands[1].shortcut.window.last"].startswith("line 7: expected a duration")
    assert found["spec.union.operands[2].behavior.min_count"].startswith("line 8: expected an integer")
    assert found["spec.union.operands[2].behavior.window.absolute.start_time"].startswith(
        "line 8: expected an RFC 3339"
    )
    assert found["spec.union.operands[3].shortcut"].startswith(
        "line 10: set only one of profile and shortcut"
    )


def test_document_level_errors() -> None:
    assert "required" in violations("displayName: x\n")["spec"]
    assert "unknown field" in violations("spec: {profile: {genders: [male]}}\nowner: me\n")["owner"]
    assert violations("spec: [1, 2]\n")["spec"].startswith("line 1: expected a mapping")
    assert "line 2" in violations("spec:\n  profile: {genders: [male]\n")["spec"]  # YAML syntax
    assert "line 2 column" in violations('{"spec":\n  {"profile": }}', fmt="json")["spec"]
    assert "expected a duration" in violations("spec: {profile: {genders: [male]}}\nttl: forever\n")["ttl"]


def test_validation_errors_get_lines() -> None:
    doc = parse_document(
        "spec:\n  intersect:\n    operands:\n      - profile: {genders: [male]}\n"
        "      - behavior:\n          eventTypes: [click]\n"
    )
    with pytest.raises(InvalidArgument) as caught:
        validate_spec(doc.spec, doc.options, field="spec")
    annotated = dict(with_lines(caught.value, doc).violations)
    # The window is missing: the nearest line known is its behavior's.
    assert annotated["spec.intersect.operands[1].behavior.window"].startswith("line 5: required")


def test_document_defaults() -> None:
    doc = PackDocument(spec=parse_spec("profile: {genders: [male]}"))
    assert "ttl" not in dump_document(doc)
