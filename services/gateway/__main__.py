"""``python -m services.gateway``: serve gRPC on FLASHCROWD_PORT and HTTP/JSON on FLASHCROWD_HTTP_PORT."""

from services.gateway.config import GatewaySettings
from services.gateway.server import build
from services.runtime import run_service


def main() -> None:
    run_service("gateway", GatewaySettings, build)


if __name__ == "__main__":
    main()
