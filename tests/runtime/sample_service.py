"""A service process as the real ones are written: ``python -m tests.runtime.sample_service``."""

from services.runtime import BaseServiceSettings, run_service

from .probe import build

if __name__ == "__main__":
    run_service("sample", BaseServiceSettings, build)
