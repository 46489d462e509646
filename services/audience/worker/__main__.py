"""``python -m services.audience.worker``: an audience build worker (settings from ``FLASHCROWD_*``)."""

from services.audience.config import AudienceSettings
from services.audience.worker.processes import die_with_parent
from services.audience.worker.server import build
from services.runtime import run_service

if __name__ == "__main__":
    die_with_parent()
    run_service("audience-worker", AudienceSettings, build)
