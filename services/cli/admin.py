"""``flashcrowd tenant create|delete`` and ``flashcrowd key create|revoke``: admin calls to the gateway.

They talk to the gateway's GatewayService over gRPC (``--gateway``, default 127.0.0.1:50050, the
port of ``flashcrowd dev up``) with an admin credential: ``--admin-key``, else
``FLASHCROWD_ADMIN_KEY``, else the system admin key ``flashcrowd dev up`` wrote into ``--dir``.
A created key's secret is printed once; only its hash is stored.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from services.cli.common import CliError

DEFAULT_GATEWAY = "127.0.0.1:50050"


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default=os.environ.get("FLASHCROWD_GATEWAY_TARGET", DEFAULT_GATEWAY))
    parser.add_argument("--admin-key", default=os.environ.get("FLASHCROWD_ADMIN_KEY"), help="admin API key")
    parser.add_argument(
        "--dir", type=Path, default=Path("var/dev"), help="where `flashcrowd dev up` keeps state"
    )
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")


def _credential(args: argparse.Namespace) -> str:
    if args.admin_key:
        return str(args.admin_key)
    from services.cli.dev import admin_key_path

    path = admin_key_path(args.dir)
    if path.exists():
        return path.read_text().strip()
    raise CliError(
        f"no admin key: pass --admin-key, set FLASHCROWD_ADMIN_KEY, or run `flashcrowd dev up` ({path})"
    )


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    import grpc
    from flashcrowd.gateway.v1 import gateway_service_pb2_grpc

    from services.runtime import error_details

    with grpc.insecure_channel(args.gateway) as channel:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        try:
            return getattr(stub, method)(request, metadata=(("x-api-key", _credential(args)),), timeout=10)
        except grpc.RpcError as error:
            details = error_details(error)
            lines = [f"{details.code.name}: {details.message}"]
            lines += [f"  {field}: {description}" for field, description in details.field_violations]
            if details.code.name == "UNAVAILABLE":
                lines.append(f"  is the gateway running at {args.gateway}? (flashcrowd dev up)")
            raise CliError("\n".join(lines)) from None


def _print(args: argparse.Namespace, message: Any, text: str) -> None:
    from google.protobuf import json_format

    print(json.dumps(json_format.MessageToDict(message), indent=2) if args.json else text)


class TenantCommand:
    NAME = "tenant"
    HELP = "create or delete tenants through the gateway (system admin)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="tenant_command", metavar="COMMAND", required=True)
        create = sub.add_parser("create", help="create a tenant")
        create.add_argument("tenant_id")
        create.add_argument("--display-name", default="")
        _connection_arguments(create)
        delete = sub.add_parser("delete", help="delete a tenant (its keys stop working)")
        delete.add_argument("tenant_id")
        _connection_arguments(delete)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from flashcrowd.gateway.v1 import gateway_service_pb2 as gw

        if args.tenant_command == "create":
            tenant = _call(
                args,
                "CreateTenant",
                gw.CreateTenantRequest(
                    tenant_id=args.tenant_id, tenant=gw.Tenant(display_name=args.display_name)
                ),
            )
            _print(args, tenant, f"created {tenant.name}")
        else:
            _call(args, "DeleteTenant", gw.DeleteTenantRequest(name=f"tenants/{args.tenant_id}"))
            print(f"deleted tenants/{args.tenant_id}")
        return 0


class KeyCommand:
    NAME = "key"
    HELP = "create or revoke API keys through the gateway (tenant admin or system admin)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="key_command", metavar="COMMAND", required=True)
        create = sub.add_parser("create", help="create a key; its secret is printed once")
        owner = create.add_mutually_exclusive_group(required=True)
        owner.add_argument("--tenant", help="a tenant's key (tenant scopes only)")
        owner.add_argument("--platform", action="store_true", help="a platform principal's key")
        create.add_argument("--scopes", required=True, help="comma-separated, e.g. packs.read,packs.write")
        _connection_arguments(create)
        revoke = sub.add_parser(
            "revoke", help="revoke a key by name (tenants/T/apiKeys/K or platform/apiKeys/K)"
        )
        revoke.add_argument("name")
        _connection_arguments(revoke)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from flashcrowd.gateway.v1 import gateway_service_pb2 as gw

        if args.key_command == "create":
            parent = "platform" if args.platform else f"tenants/{args.tenant}"
            scopes = [scope.strip() for scope in args.scopes.split(",") if scope.strip()]
            response = _call(args, "CreateApiKey", gw.CreateApiKeyRequest(parent=parent, scopes=scopes))
            _print(
                args,
                response,
                f"{response.api_key.name} ({' '.join(response.api_key.scopes)})\n"
                f"secret (shown once): {response.secret}",
            )
        else:
            _call(args, "RevokeApiKey", gw.RevokeApiKeyRequest(name=args.name))
            print(f"revoked {args.name}")
        return 0
