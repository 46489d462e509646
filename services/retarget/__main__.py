"""``python -m services.retarget``: the retarget service, configured by FLASHCROWD_* variables."""

from services.retarget.config import RetargetSettings
from services.retarget.server import build
from services.runtime import run_service

if __name__ == "__main__":
    run_service("retarget", RetargetSettings, build)
