"""python -m analytics_service"""

from analytics_service import app
from analytics_service.settings import AnalyticsSettings
from common.logging import configure_logging
from common.loop import run
from common.settings import load_settings


def main() -> None:
    settings = load_settings(AnalyticsSettings)
    configure_logging("analytics_service", settings.log_level, settings.log_format)
    run(app.run(settings), settings.event_loop)


if __name__ == "__main__":
    main()
