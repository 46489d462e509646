"""``python -m services.audience``: the audience service (settings from ``FLASHCROWD_*``)."""

from services.audience.config import AudienceSettings
from services.audience.server import build
from services.runtime import run_service


def main() -> None:
    run_service("audience", AudienceSettings, build)


if __name__ == "__main__":
    main()
