"""An OpenAPI 3.1 document of the HTTP/JSON routes, generated from the proto descriptors.

``python -m services.gateway.openapi > openapi/openapi.json`` (or ``flashcrowd gateway openapi``) writes
it; the gateway serves the same
document at ``/openapi.json``. Schemas follow protobuf's JSON mapping: lowerCamelCase names, 64-bit
integers as strings, enums as their names, Timestamp/Duration as strings.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from google.protobuf import descriptor

from services.gateway.catalog import PUBLIC_SERVICES, is_repeated, message_of
from services.gateway.transcoding import Route, all_routes

FD = descriptor.FieldDescriptor
_INT32 = {FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32}
_UINT32 = {FD.TYPE_UINT32, FD.TYPE_FIXED32}
_INT64 = {FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64, FD.TYPE_UINT64, FD.TYPE_FIXED64}

_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "example": "3600s",
    },
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32"},
    "google.protobuf.Int64Value": {"type": "string", "format": "int64"},
    "google.protobuf.DoubleValue": {"type": "number", "format": "double"},
}

ERROR_SCHEMA = {
    "type": "object",
    "description": "google.rpc.Status in Google's JSON error shape",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "integer", "description": "HTTP status"},
                "status": {"type": "string", "description": "gRPC status name, e.g. NOT_FOUND"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"$ref": "#/components/schemas/google.protobuf.Any"}},
            },
        }
    },
}


class _Schemas:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def ref(self, message: descriptor.Descriptor) -> dict[str, Any]:
        self.add(message)
        return {"$ref": f"#/components/schemas/{message.full_name}"}

    def add(self, message: descriptor.Descriptor) -> None:
        name = message.full_name
        if name in self.schemas:
            return
        if name in _WELL_KNOWN:
            self.schemas[name] = dict(_WELL_KNOWN[name])
            return
        self.schemas[name] = {}  # placeholder for recursive types
        properties: dict[str, Any] = {}
        for field in message.fields:
            properties[field.json_name] = self.field_schema(field)
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        oneofs = [o for o in message.oneofs if not getattr(o, "has_presence", False) or len(o.fields) > 1]
        if oneofs:
            schema["description"] = "; ".join(
                "at most one of " + ", ".join(f.json_name for f in o.fields) for o in oneofs
            )
        self.schemas[name] = schema

    def field_schema(self, field: FD) -> dict[str, Any]:
        if field.type == FD.TYPE_MESSAGE and message_of(field).GetOptions().map_entry:
            value_field = message_of(field).fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value_field)}
        single = self.single(field)
        if is_repeated(field):
            return {"type": "array", "items": single}
        return single

    def single(self, field: FD) -> dict[str, Any]:
        kind = field.type
        if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return {"type": "number", "format": "double" if kind == FD.TYPE_DOUBLE else "float"}
        if kind in _INT32:
            return {"type": "integer", "format": "int32"}
        if kind in _UINT32:
            return {"type": "integer", "format": "int64", "minimum": 0}
        if kind in _INT64:
            return {
                "type": "string",
                "format": "uint64" if kind in (FD.TYPE_UINT64, FD.TYPE_FIXED64) else "int64",
            }
        if kind == FD.TYPE_BOOL:
            return {"type": "boolean"}
        if kind == FD.TYPE_STRING:
            return {"type": "string"}
        if kind == FD.TYPE_BYTES:
            return {"type": "string", "format": "byte"}
        if kind == FD.TYPE_ENUM:
            assert field.enum_type is not None
            return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
        return self.ref(message_of(field))


def _query_params(route: Route, schemas: _Schemas) -> list[dict[str, Any]]:
    bound = {var.field_path.split(".")[0] for var in route.variables}
    params = []
    for field in route.info.descriptor.input_type.fields:
        if field.name in bound or (
            field.type == FD.TYPE_MESSAGE and message_of(field).full_name not in _WELL_KNOWN
        ):
            continue
        params.append(
            {
                "name": field.json_name,
                "in": "query",
                "required": False,
                "schema": schemas.field_schema(field),
                **({"explode": True} if is_repeated(field) else {}),
            }
        )
    return params


def _body_schema(route: Route, schemas: _Schemas) -> dict[str, Any]:
    request = route.info.descriptor.input_type
    if route.body != "*":
        return schemas.field_schema(request.fields_by_name[route.body])
    schemas.add(request)
    bound = {var.field_path.split(".")[0] for var in route.variables}
    base = schemas.schemas[request.full_name]
    properties = {
        field.json_name: base["properties"][field.json_name]
        for field in request.fields
        if field.name not in bound
    }
    return {"type": "object", "properties": properties}


def _operation_id(service: str, method: str, used: set[str]) -> str:
    base = f"{service.rsplit('.', 1)[-1]}_{method}"
    candidate, index = base, 2
    while candidate in used:  # additional bindings of one method
        candidate, index = f"{base}_{index}", index + 1
    used.add(candidate)
    return candidate


def openapi_document() -> dict[str, Any]:
    """The whole document; deterministic (sorted paths) so a committed copy can be diffed."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for route in all_routes():
        info = route.info
        operation: dict[str, Any] = {
            "operationId": _operation_id(info.service, info.name, used),
            "summary": f"{info.service}.{info.name}",
            "tags": [info.service.rsplit(".", 1)[-1]],
            "description": (
                f"Transcoded to gRPC `{info.full}`. Scopes: "
                + (", ".join(sorted(info.scopes)) if info.scopes else "any authenticated caller")
                + ("; retried by the gateway when the backend is unavailable." if info.idempotent else ".")
            ),
            "parameters": [
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": text,
                }
                for name, text in route.path_params
            ],
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": schemas.ref(info.descriptor.output_type)}},
                },
                "default": {
                    "description": "Error (google.rpc.Status)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            },
        }
        if route.body:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _body_schema(route, schemas)}},
            }
        else:
            operation["parameters"].extend(_query_params(route, schemas))
        paths.setdefault(route.openapi_path, {})[route.http_method.lower()] = operation
    schemas.add(descriptor_of("google.protobuf.Any"))
    components_schemas = dict(sorted(schemas.schemas.items()))
    components_schemas["Error"] = ERROR_SCHEMA
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flashcrowd API",
            "version": "v1",
            "description": "HTTP/JSON transcoding of the flashcrowd gRPC API ("
            + ", ".join(PUBLIC_SERVICES)
            + "). Every call needs `Authorization: Bearer <JWT or API key>` or `X-Api-Key`.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}, {"apiKeyAuth": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT or fc_ API key"},
                "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            },
            "schemas": components_schemas,
        },
    }


def descriptor_of(full_name: str) -> descriptor.Descriptor:
    from google.protobuf import any_pb2

    assert full_name == "google.protobuf.Any"
    return any_pb2.Any.DESCRIPTOR


def main() -> None:
    json.dump(openapi_document(), sys.stdout, indent=2)
    sys.stdout.write("\n")  # same bytes as services.gateway.cli.render()


if __name__ == "__main__":
    main()
