"""``python -m services.monitor``: SaleMonitorService and the campaign rules, configured by FLASHCROWD_*."""

from services.monitor.config import MonitorSettings
from services.monitor.server import build
from services.runtime import run_service

if __name__ == "__main__":
    run_service("sale-monitor", MonitorSettings, build)
