"""``python -m services.ingest``: the ingest process (settings from ``FLASHCROWD_*``)."""

from services.events.config import RealtimeSettings
from services.ingest.server import build
from services.runtime import run_service

if __name__ == "__main__":
    run_service("ingest", RealtimeSettings, build)
