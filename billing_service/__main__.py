"""python -m billing_service"""

from billing_service import app
from billing_service.settings import BillingSettings
from common.logging import configure_logging
from common.loop import run
from common.settings import load_settings


def main() -> None:
    settings = load_settings(BillingSettings)
    configure_logging("billing_service", settings.log_level, settings.log_format)
    run(app.run(settings), settings.event_loop)


if __name__ == "__main__":
    main()
