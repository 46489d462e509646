"""HTTP/JSON transcoding rules read from the ``google.api.http`` annotations of the served methods.

A rule like ``post: "/v1/{parent=tenants/*}/packs" body: "pack"`` becomes a ``Route``: a regular
expression over the raw URL path, the request fields bound by path variables, and where the JSON
body goes. Requests are built with protobuf's JSON mapping (``json_format``) so field names may be
``lowerCamelCase`` or ``snake_case``; query parameters fill the remaining fields (``?pageSize=10``,
``?profile.regions=CN-GD&profile.regions=CN-BJ`` for repeated ones).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from google.api import http_pb2
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from services.gateway.catalog import METHODS, MethodInfo, is_repeated, message_of
from services.runtime import InvalidArgument

_VARIABLE = re.compile(r"\{([a-zA-Z0-9_.]+)(?:=([^}]*))?\}")
_HTTP_METHODS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True)
class PathVariable:
    field_path: str  # dotted request field, e.g. "name"
    pattern: str  # segment pattern, e.g. "tenants/*/packs/*"
    group: str  # regex group name


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one gRPC method."""

    http_method: str  # upper case
    template: str
    info: MethodInfo = field(compare=False)
    regex: re.Pattern[str] = field(compare=False)
    variables: tuple[PathVariable, ...]
    body: str  # "", "*" or a field name
    verb: str

    def match(self, raw_path: str) -> dict[str, str] | None:
        found = self.regex.fullmatch(raw_path)
        if found is None:
            return None
        return {var.field_path: unquote(found.group(var.group)) for var in self.variables}

    @property
    def openapi_path(self) -> str:
        """The template with one ``{param}`` per wildcard segment (``/v1/tenants/{tenant}/packs/{pack}``)."""
        path, verb = _split_verb(self.template)

        def expand(match: re.Match[str]) -> str:
            name, pattern = match.group(1), match.group(2)
            if not pattern:
                return "{" + name + "}"
            return "/".join(_param_names(pattern, name))

        expanded = _VARIABLE.sub(expand, path)
        return expanded + (f":{verb}" if verb else "")

    @property
    def path_params(self) -> list[tuple[str, str]]:
        """``(param, description)`` of the OpenAPI path parameters, in order."""
        params: list[tuple[str, str]] = []
        for var in self.variables:
            for name in _param_names(var.pattern, var.field_path):
                if name.startswith("{"):
                    params.append((name.strip("{}"), f"segment of `{var.field_path}` ({var.pattern})"))
        return params


def _param_names(pattern: str, field_path: str) -> list[str]:
    """``tenants/*/packs/*`` -> ``["tenants", "{tenant}", "packs", "{pack}"]``."""
    parts: list[str] = []
    segments = pattern.split("/")
    for index, segment in enumerate(segments):
        if segment in ("*", "**"):
            previous = segments[index - 1] if index > 0 else field_path.rsplit(".", 1)[-1]
            singular = previous[:-1] if previous.endswith("s") else previous
            parts.append("{" + singular + "}")
        else:
            parts.append(segment)
    return parts


def _split_verb(template: str) -> tuple[str, str]:
    """``/v1/{name=tenants/*/packs/*}:refresh`` -> (``/v1/{name=tenants/*/packs/*}``, ``refresh``)."""
    start = max(template.rfind("}"), template.rfind("/"))
    colon = template.find(":", start + 1)
    if colon == -1:
        return template, ""
    return template[:colon], template[colon + 1 :]


def _segment_regex(pattern: str) -> str:
    parts = []
    for segment in pattern.split("/"):
        if segment == "**":
            parts.append(r"[^:]+?")
        elif segment == "*":
            parts.append(r"[^/:]+")
        else:
            parts.append(re.escape(segment))
    return "/".join(parts)


def compile_route(info: MethodInfo, rule: http_pb2.HttpRule) -> Route:
    http_method = ""
    template = ""
    for name in _HTTP_METHODS:
        value = getattr(rule, name)
        if value:
            http_method, template = name.upper(), value
            break
    if not template and rule.HasField("custom"):
        http_method, template = rule.custom.kind.upper(), rule.custom.path
    if not template:
        raise ValueError(f"{info.key}: http rule without a path")
    path, verb = _split_verb(template)
    variables: list[PathVariable] = []
    regex_parts: list[str] = []
    position = 0
    for index, match in enumerate(_VARIABLE.finditer(path)):
        regex_parts.append(re.escape(path[position : match.start()]))
        field_path, pattern = match.group(1), match.group(2) or "*"
        group = f"v{index}"
        variables.append(PathVariable(field_path, pattern, group))
        regex_parts.append(f"(?P<{group}>{_segment_regex(pattern)})")
        position = match.end()
    regex_parts.append(re.escape(path[position:]))
    if verb:
        regex_parts.append(re.escape(":" + verb))
    return Route(
        http_method=http_method,
        template=template,
        info=info,
        regex=re.compile("".join(regex_parts)),
        variables=tuple(variables),
        body=rule.body,
        verb=verb,
    )


#: Bindings the gateway adds: google.longrunning's own annotations only know ``operations/**`` names,
#: while flashcrowd's operations are named ``tenants/{tenant}/operations/{id}``.
EXTRA_RULES: dict[str, tuple[http_pb2.HttpRule, ...]] = {
    "/google.longrunning.Operations/ListOperations": (
        http_pb2.HttpRule(get="/v1/{name=tenants/*}/operations"),
    ),
    "/google.longrunning.Operations/GetOperation": (
        http_pb2.HttpRule(get="/v1/{name=tenants/*/operations/*}"),
    ),
    "/google.longrunning.Operations/DeleteOperation": (
        http_pb2.HttpRule(delete="/v1/{name=tenants/*/operations/*}"),
    ),
    "/google.longrunning.Operations/CancelOperation": (
        http_pb2.HttpRule(post="/v1/{name=tenants/*/operations/*}:cancel", body="*"),
    ),
    "/google.longrunning.Operations/WaitOperation": (
        http_pb2.HttpRule(post="/v1/{name=tenants/*/operations/*}:wait", body="*"),
        http_pb2.HttpRule(post="/v1/{name=tenants/*/campaigns/*/operations/*}:wait", body="*"),
    ),
}


def all_routes() -> list[Route]:
    """Every annotated method's routes (plus EXTRA_RULES); routes with a custom verb are tried first."""
    routes = [
        compile_route(info, rule)
        for info in METHODS.values()
        for rule in (*info.http_rules, *EXTRA_RULES.get(info.full, ()))
    ]
    return sorted(routes, key=lambda route: (route.verb == "", -route.template.count("/")))


# --- building requests -----------------------------------------------------------------------


def _field(message_descriptor: descriptor.Descriptor, name: str) -> descriptor.FieldDescriptor | None:
    found = message_descriptor.fields_by_name.get(name)
    if found is not None:
        return found
    for candidate in message_descriptor.fields:
        if candidate.json_name == name:
            return candidate
    return None


def _set_path(
    target: dict[str, Any], message_descriptor: descriptor.Descriptor, path: str, values: Sequence[str]
) -> None:
    """Put query/path values at a dotted field path of a JSON dict, typed by the descriptor."""
    parts = path.split(".")
    current_descriptor = message_descriptor
    current = target
    for depth, part in enumerate(parts):
        field_descriptor = _field(current_descriptor, part)
        if field_descriptor is None:
            raise InvalidArgument(path, "no such field")
        key = field_descriptor.name
        last = depth == len(parts) - 1
        if not last:
            if field_descriptor.type != descriptor.FieldDescriptor.TYPE_MESSAGE or is_repeated(
                field_descriptor
            ):
                raise InvalidArgument(path, "cannot be set from the URL")
            current = current.setdefault(key, {})
            if not isinstance(current, dict):
                raise InvalidArgument(path, "set twice")
            current_descriptor = message_of(field_descriptor)
            continue
        if field_descriptor.type == descriptor.FieldDescriptor.TYPE_MESSAGE and not (
            message_of(field_descriptor).full_name.startswith("google.protobuf.")
        ):
            raise InvalidArgument(path, "a message field cannot be set from the URL")
        converted = [_scalar(field_descriptor, value, path) for value in values]
        if is_repeated(field_descriptor):
            current[key] = converted
        else:
            if len(converted) != 1:
                raise InvalidArgument(path, "given more than once")
            current[key] = converted[0]


def _scalar(field_descriptor: descriptor.FieldDescriptor, value: str, path: str) -> Any:
    if field_descriptor.type == descriptor.FieldDescriptor.TYPE_BOOL:
        lowered = value.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise InvalidArgument(path, "must be true or false")
    return value  # json_format converts numeric strings, enum names and well-known types itself


def build_request(
    route: Route,
    path_values: Mapping[str, str],
    query: Mapping[str, Sequence[str]],
    body: Any,
) -> Message:
    """The gRPC request of an HTTP call: body per the rule, then query parameters, then the path."""
    info = route.info
    request_descriptor = info.descriptor.input_type
    document: dict[str, Any] = {}
    if route.body == "*":
        if body is not None:
            if not isinstance(body, dict):
                raise InvalidArgument("body", "must be a JSON object")
            document = dict(body)
    elif route.body:
        body_field = _field(request_descriptor, route.body)
        assert body_field is not None
        if body is not None:
            document[body_field.name] = body
    elif body not in (None, {}):
        raise InvalidArgument("body", f"{route.http_method} {route.template} takes no body")
    if route.body != "*":
        for name, values in query.items():
            if name in ("$alt", "alt", "access_token", "key"):
                continue
            _set_path(document, request_descriptor, name, values)
    for field_path, value in path_values.items():
        # Path values always win over the same field in the body (as in Google's transcoding).
        _strip(document, request_descriptor, field_path)
        _set_path(document, request_descriptor, field_path, [value])
    message = info.request_class()
    try:
        json_format.ParseDict(document, message, ignore_unknown_fields=False, max_recursion_depth=64)
    except json_format.ParseError as error:
        raise InvalidArgument("body", str(error)[:500]) from None
    except (RecursionError, ValueError, TypeError) as error:
        raise InvalidArgument(
            "body", f"not a valid {request_descriptor.name}: {type(error).__name__}"
        ) from None
    return message


def _strip(document: dict[str, Any], message_descriptor: descriptor.Descriptor, field_path: str) -> None:
    head, _, rest = field_path.partition(".")
    field_descriptor = _field(message_descriptor, head)
    if field_descriptor is None:
        return
    for key in {field_descriptor.name, field_descriptor.json_name}:
        if not rest:
            document.pop(key, None)
        elif isinstance(document.get(key), dict):
            _strip(document[key], message_of(field_descriptor), rest)


__all__ = ["PathVariable", "Route", "all_routes", "build_request", "compile_route"]
