"""Helper of the audience benchmarks: run ``python -m services.audience`` as a separate process."""

from __future__ import annotations

from bench.service_proc import ServiceProcess, settings_env


class AudienceProcess(ServiceProcess):
    """The audience service in its own process (so the benchmark client does not share its GIL)."""

    def __init__(self, store_url: str, **settings: str) -> None:
        super().__init__("services.audience", settings_env(store_url=store_url, **settings))
