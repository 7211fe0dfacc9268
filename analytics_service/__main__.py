"""python -m analytics_service"""

import asyncio

from analytics_service import app
from analytics_service.settings import AnalyticsSettings
from common.logging import configure_logging
from common.settings import load_settings


def main() -> None:
    settings = load_settings(AnalyticsSettings)
    configure_logging("analytics_service", settings.log_level)
    asyncio.run(app.run(settings))


if __name__ == "__main__":
    main()
