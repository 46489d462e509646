"""``flashcrowd gateway openapi [-o FILE]``: the OpenAPI document of the HTTP/JSON routes.

A ``services.cli`` command module (``NAME``, ``HELP``, ``add_arguments``, ``run``); also runnable as
``python -m services.gateway.openapi``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME = "gateway"
HELP = "gateway tools: the OpenAPI document of the HTTP/JSON routes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="gateway_command", metavar="COMMAND", required=True)
    openapi = sub.add_parser("openapi", help="print the OpenAPI 3.1 document (generated from the protos)")
    openapi.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")


def render() -> str:
    from services.gateway.openapi import openapi_document

    return json.dumps(openapi_document(), indent=2) + "\n"


def run(args: argparse.Namespace) -> int:
    text = render()
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0
