"""Pack specs as YAML or JSON files (the protobuf JSON mapping), with errors that name line and field.

A file is either a bare ``PackSpec`` or a document for the batch CLI::

    displayName: Clicked in the sale hour, did not buy
    labels: {campaign: "618"}
    spec:
      exclude:
        base: {shortcut: {kind: clickers, window: {absolute: {startTime: 2024-06-18T20:00:00Z,
                                                              endTime: 2024-06-18T21:00:00Z}}}}
        subtract:
          - shortcut: {kind: purchasers, window: {last: 72h}}
    options: {includeBots: false}
    ttl: 30d

Besides the canonical protobuf JSON (``EVENT_TYPE_CLICK``, ``"259200s"``) the reader accepts what
people type: enum values without their prefix and in any case (``click``, ``25_30``, ``female``,
``purchasers``), durations like ``72h``/``3d``/``1h30m``, and YAML timestamps (UTC when no offset).
Field names may be camelCase or snake_case. Errors name the field by its proto path
(``spec.behavior.event_types[0]``) and the line it is on.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import yaml
from flashcrowd.audience.v1 import spec_pb2
from google.protobuf import duration_pb2, json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from services.runtime.errors import InvalidArgument

__all__ = [
    "PackDocument",
    "SpecFormatError",
    "dump_document",
    "dump_spec",
    "parse_document",
    "parse_spec",
    "read_document",
    "spec_from_data",
    "spec_to_data",
    "with_lines",
    "write_document",
]

_DOC_FIELDS = {
    "displayName": "display_name",
    "display_name": "display_name",
    "labels": "labels",
    "spec": "spec",
    "options": "options",
    "ttl": "ttl",
}
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(d|h|ms|us|ns|m|s)")
_INT_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}
_FLOAT_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


class SpecFormatError(InvalidArgument):
    """A spec file that cannot be read: every problem with its field path and line."""

    def __init__(self, violations: list[tuple[str, str]], *, source: str = "<spec>") -> None:
        self.source = source
        super().__init__(violations, reason="INVALID_PACK_SPEC_FILE")


@dataclass
class PackDocument:
    """A spec file's content: the spec plus the pack fields the CLI fills in."""

    spec: spec_pb2.PackSpec
    display_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    options: spec_pb2.BuildOptions = field(default_factory=spec_pb2.BuildOptions)
    ttl: duration_pb2.Duration | None = None
    #: Proto field path (``spec.behavior.window``) -> 1-based line in the source, where known.
    lines: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    source: str = "<spec>"


# --- reading -------------------------------------------------------------------------------------


def read_document(path: str | Path) -> PackDocument:
    """Read a spec file; the format follows the extension (``.json``, else YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecFormatError([("spec", f"cannot read {path}: {exc}")], source=str(path)) from exc
    fmt = "json" if path.suffix.lower() == ".json" else "yaml"
    return parse_document(text, fmt=fmt, source=str(path))


def parse_document(text: str, *, fmt: str | None = None, source: str = "<spec>") -> PackDocument:
    """Parse a document (or a bare spec) from YAML/JSON text. ``fmt``: ``"yaml"``, ``"json"`` or sniffed."""
    data, node = _load(text, fmt, source)
    lines: dict[str, int] = {}
    if node is not None and (line := _line(node)) is not None:
        lines[""] = line
    problems: list[tuple[str, str]] = []
    if not isinstance(data, dict):
        raise SpecFormatError([("spec", _at(node, "expected a mapping with a spec"))], source=source)

    spec_fields = {f.json_name for f in spec_pb2.PackSpec.DESCRIPTOR.fields} | {
        f.name for f in spec_pb2.PackSpec.DESCRIPTOR.fields
    }
    if "spec" not in data and data and set(data) <= spec_fields:
        data = {"spec": data}  # a bare spec
        node = _SyntheticMapping({"spec": node}) if node is not None else None

    doc = PackDocument(spec=spec_pb2.PackSpec(), source=source, lines=lines)
    children, keys = _children(node), _key_nodes(node)
    for key, value in data.items():
        name = _DOC_FIELDS.get(key) if isinstance(key, str) else None
        child = children.get(key)
        if name is None:
            problems.append(
                (
                    str(key),
                    _at(child, f"unknown field; expected one of {', '.join(sorted(set(_DOC_FIELDS)))}"),
                )
            )
            continue
        _note(lines, name, keys.get(key, child))
        if name == "display_name":
            if not isinstance(value, str):
                problems.append((name, _at(child, "expected a string")))
            else:
                doc.display_name = value
        elif name == "labels":
            doc.labels = _labels(value, child, problems, lines)
        elif name == "ttl":
            seconds = _duration_seconds(value)
            if seconds is None or seconds < 0:
                problems.append((name, _at(child, f"expected a duration like 30d or 72h, got {value!r}")))
            else:
                doc.ttl = _to_duration(seconds)
        elif name == "spec":
            doc.spec = _convert(value, child, spec_pb2.PackSpec, "spec", problems, lines)
        elif name == "options":
            doc.options = _convert(value, child, spec_pb2.BuildOptions, "options", problems, lines)
    if "spec" not in data:
        problems.append(("spec", _at(node, "required")))
    if problems:
        raise SpecFormatError(problems, source=source)
    return doc


def parse_spec(text: str, *, fmt: str | None = None, source: str = "<spec>") -> spec_pb2.PackSpec:
    """Just the spec of a document or bare spec."""
    return parse_document(text, fmt=fmt, source=source).spec


def spec_from_data(data: Any, *, field: str = "spec") -> spec_pb2.PackSpec:
    """A spec from JSON-shaped data (dicts/lists), with the same leniency as files."""
    problems: list[tuple[str, str]] = []
    spec = _convert(data, None, spec_pb2.PackSpec, field, problems, {})
    if problems:
        raise SpecFormatError(problems)
    return spec


def with_lines(error: InvalidArgument, doc: PackDocument) -> InvalidArgument:
    """``error`` (e.g. from ``validate_spec(doc.spec, field="spec")``) with lines added where known."""
    out: list[tuple[str, str]] = []
    for path, description in error.violations:
        line = _nearest_line(doc.lines, path)
        out.append((path, f"line {line}: {description}" if line else description))
    return InvalidArgument(out, reason=error.reason)


# --- writing -------------------------------------------------------------------------------------


def spec_to_data(spec: spec_pb2.PackSpec) -> dict[str, Any]:
    """Canonical protobuf JSON mapping (camelCase, enum names, ``"259200s"``)."""
    return json_format.MessageToDict(spec)


def dump_spec(spec: spec_pb2.PackSpec, fmt: str = "yaml") -> str:
    return _dump(spec_to_data(spec), fmt)


def dump_document(doc: PackDocument, fmt: str = "yaml") -> str:
    data: dict[str, Any] = {}
    if doc.display_name:
        data["displayName"] = doc.display_name
    if doc.labels:
        data["labels"] = dict(doc.labels)
    data["spec"] = spec_to_data(doc.spec)
    options = json_format.MessageToDict(doc.options)
    if options:
        data["options"] = options
    if doc.ttl is not None:
        data["ttl"] = json_format.MessageToDict(doc.ttl)
    return _dump(data, fmt)


def write_document(path: str | Path, doc: PackDocument) -> None:
    path = Path(path)
    fmt = "json" if path.suffix.lower() == ".json" else "yaml"
    path.write_text(dump_document(doc, fmt), encoding="utf-8")


def _dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    raise ValueError(f"unknown format {fmt!r}: expected yaml or json")


# --- loading with positions ------------------------------------------------------------------------


class _SyntheticMapping:
    """Stands in for a YAML mapping node when a bare spec is wrapped into a document."""

    def __init__(self, children: dict[str, Any]) -> None:
        self.children = children
        inner = children.get("spec")
        self.start_mark = getattr(inner, "start_mark", None)


def _load(text: str, fmt: str | None, source: str) -> tuple[Any, Any]:
    if fmt is None:
        fmt = "json" if text.lstrip().startswith(("{", "[")) else "yaml"
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecFormatError(
                [("spec", f"line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}")], source=source
            ) from exc
    elif fmt == "yaml":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
            if context and context_mark is not None:  # where the unclosed construct began
                problem += f" ({context} at line {context_mark.line + 1} column {context_mark.column + 1})"
            raise SpecFormatError([("spec", f"{where}invalid YAML: {problem}")], source=source) from exc
    else:
        raise ValueError(f"unknown format {fmt!r}: expected yaml or json")
    try:  # JSON is (close enough to) YAML: positions for both come from the YAML composer
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        node = None
    return data, node


def _children(node: Any) -> dict[Any, Any]:
    if isinstance(node, _SyntheticMapping):
        return node.children
    if isinstance(node, yaml.MappingNode):
        return {_children_key(k): v for k, v in node.value}
    return {}


def _key_nodes(node: Any) -> dict[Any, Any]:
    """Key -> the node of the key itself: a field's line is where its name is written."""
    if isinstance(node, yaml.MappingNode):
        return {_children_key(k): k for k, _ in node.value}
    return {}


def _children_key(key_node: Any) -> Any:
    key = key_node.value
    if key_node.tag.endswith(":int"):
        with contextlib.suppress(ValueError):
            key = int(key)
    return key


def _items(node: Any) -> list[Any]:
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _line(node: Any) -> int | None:
    mark = getattr(node, "start_mark", None)
    return mark.line + 1 if mark is not None else None


def _at(node: Any, message: str) -> str:
    line = _line(node)
    return f"line {line}: {message}" if line else message


def _note(lines: dict[str, int], path: str, node: Any) -> None:
    line = _line(node)
    if line:
        lines[path] = line


def _nearest_line(lines: Mapping[str, int], path: str) -> int | None:
    # Validation may name a field that is absent from the file (a missing window): use its parent's.
    while True:
        if path in lines:
            return lines[path]
        if not path:
            return None
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""


# --- conversion ------------------------------------------------------------------------------------


def _labels(value: Any, node: Any, problems: list[tuple[str, str]], lines: dict[str, int]) -> dict[str, str]:
    if not isinstance(value, dict):
        problems.append(("labels", _at(node, "expected a mapping of label -> value")))
        return {}
    out: dict[str, str] = {}
    children = _children(node)
    for key, item in value.items():
        child = children.get(key)
        _note(lines, f"labels.{key}", child)
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            problems.append((f"labels.{key}", _at(child, "expected a string value")))
        else:
            out[str(key)] = str(item)
    return out


def _convert(
    value: Any,
    node: Any,
    message_type: type[Message],
    path: str,
    problems: list[tuple[str, str]],
    lines: dict[str, int],
) -> Any:
    """Normalise ``value`` against the message type, record problems, then ``ParseDict`` it."""
    before = len(problems)
    descriptor = cast(Descriptor, message_type.DESCRIPTOR)  # upb's descriptor has the same API
    normalised = _message(value, node, descriptor, path, problems, lines)
    message = message_type()
    if len(problems) == before:
        try:
            json_format.ParseDict(normalised, message)
        except json_format.ParseError as exc:  # should not happen after normalising; keep the text
            problems.append((path, _at(node, str(exc))))
    return message


def _message(
    value: Any,
    node: Any,
    descriptor: Descriptor,
    path: str,
    problems: list[tuple[str, str]],
    lines: dict[str, int],
) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append((path, _at(node, f"expected a mapping ({descriptor.name}), got {_kind(value)}")))
        return {}
    by_name = {f.json_name: f for f in descriptor.fields} | {f.name: f for f in descriptor.fields}
    children, keys = _children(node), _key_nodes(node)
    out: dict[str, Any] = {}
    oneofs: dict[str, str] = {}
    for key, item in value.items():
        child = children.get(key)
        fd = by_name.get(key) if isinstance(key, str) else None
        if fd is None:
            known = ", ".join(f.json_name for f in descriptor.fields)
            problems.append(
                (f"{path}.{key}", _at(child, f"unknown field of {descriptor.name}; known: {known}"))
            )
            continue
        sub = f"{path}.{fd.name}"
        _note(lines, sub, keys.get(key, child))
        if fd.containing_oneof is not None:
            other = oneofs.get(fd.containing_oneof.name)
            if other is not None:
                problems.append((sub, _at(child, f"set only one of {other} and {fd.name}")))
                continue
            oneofs[fd.containing_oneof.name] = fd.name
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            problems.append((sub, _at(child, "map fields are not supported here")))
            continue
        if fd.is_repeated:
            items = item if isinstance(item, list) else None
            if items is None:
                if item is None:
                    continue
                items = [item]  # a single value where a list is expected: be lenient
                item_nodes = [child]
            else:
                item_nodes = _items(child)
            converted = []
            for i, element in enumerate(items):
                element_node = item_nodes[i] if i < len(item_nodes) else None
                _note(lines, f"{sub}[{i}]", element_node)
                converted.append(_single(element, element_node, fd, f"{sub}[{i}]", problems, lines))
            out[fd.json_name] = converted
        else:
            out[fd.json_name] = _single(item, child, fd, sub, problems, lines)
    return out


def _single(
    value: Any,
    node: Any,
    fd: FieldDescriptor,
    path: str,
    problems: list[tuple[str, str]],
    lines: dict[str, int],
) -> Any:
    if fd.message_type is not None:
        full = fd.message_type.full_name
        if full == "google.protobuf.Duration":
            seconds = _duration_seconds(value)
            if seconds is None:
                problems.append((path, _at(node, f"expected a duration like 72h, 3d or 90s, got {value!r}")))
                return "0s"
            return _duration_json(seconds)
        if full == "google.protobuf.Timestamp":
            stamp = _timestamp(value)
            if stamp is None:
                problems.append(
                    (path, _at(node, f"expected an RFC 3339 time like 2024-06-18T20:00:00Z, got {value!r}"))
                )
                return "1970-01-01T00:00:00Z"
            return stamp
        return _message(value, node, fd.message_type, path, problems, lines)
    if fd.enum_type is not None:
        number = None
        if isinstance(node, yaml.ScalarNode) and isinstance(value, int):
            # YAML 1.1 reads 25_30 as the integer 2530: match the text as written first.
            number = _enum_number(fd.enum_type, node.value)
        if number is None:
            number = _enum_number(fd.enum_type, value)
        if number is None:
            known = ", ".join(_short_names(fd.enum_type))
            problems.append((path, _at(node, f"unknown {fd.enum_type.name} {value!r}; known: {known}")))
            return 0
        return number
    if fd.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            problems.append((path, _at(node, f"expected true or false, got {value!r}")))
            return False
        return value
    if fd.type in _INT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | str):
            problems.append((path, _at(node, f"expected an integer, got {value!r}")))
            return 0
        try:
            number = int(value)
        except ValueError:
            problems.append((path, _at(node, f"expected an integer, got {value!r}")))
            return 0
        unsigned = fd.cpp_type in (FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64)
        bits = 32 if fd.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_UINT32) else 64
        low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        if not low <= number <= high:
            problems.append((path, _at(node, f"{number} is out of range [{low}, {high}]")))
            return 0
        return number
    if fd.type in _FLOAT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append((path, _at(node, f"expected a number, got {value!r}")))
            return 0.0
        return float(value)
    if fd.type == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            problems.append((path, _at(node, f"expected a string, got {_kind(value)}")))
            return ""
        return value
    problems.append((path, _at(node, "unsupported field type")))
    return None


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _enum_prefix(enum: EnumDescriptor) -> str:
    names = [v.name for v in enum.values]
    if len(names) < 2:
        return ""
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[: prefix.rfind("_") + 1] if "_" in prefix else ""


def _short_names(enum: EnumDescriptor) -> list[str]:
    prefix = _enum_prefix(enum)
    return [v.name.removeprefix(prefix).lower() for v in enum.values if v.number != 0]


def _enum_number(enum: EnumDescriptor, value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value in enum.values_by_number else None
    if not isinstance(value, str):
        return None
    key = value.strip().upper().replace("-", "_").replace(" ", "_")
    found = enum.values_by_name.get(key) or enum.values_by_name.get(_enum_prefix(enum) + key)
    return found.number if found is not None else None


def _duration_seconds(value: Any) -> float | None:
    """``"72h"``, ``"1h30m"``, ``"259200s"``, ``"3d"``, or a number of seconds -> seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if not isinstance(value, str):
        return None
    text = value.strip().lower().replace(" ", "")
    negative = text.startswith("-")
    text = text.lstrip("+-")
    if not text:
        return None
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        return None
    return -total if negative else total


def _to_duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(timedelta(seconds=seconds))
    return out


def _duration_json(seconds: float) -> str:
    return _to_duration(seconds).ToJsonString()


def _timestamp(value: Any) -> str | None:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None:  # times are UTC by convention
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (
        f".{moment.microsecond:06d}Z" if moment.microsecond else "Z"
    )
