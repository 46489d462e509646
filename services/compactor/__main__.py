"""``python -m services.compactor``: the compactor process (settings from ``FLASHCROWD_*``)."""

from services.compactor.server import build
from services.events.config import RealtimeSettings
from services.runtime import run_service

if __name__ == "__main__":
    run_service("compactor", RealtimeSettings, build)
