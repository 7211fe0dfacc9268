"""python -m billing_service"""

import asyncio

from billing_service import app
from billing_service.settings import BillingSettings
from common.logging import configure_logging
from common.settings import load_settings


def main() -> None:
    settings = load_settings(BillingSettings)
    configure_logging("billing_service", settings.log_level)
    asyncio.run(app.run(settings))


if __name__ == "__main__":
    main()
