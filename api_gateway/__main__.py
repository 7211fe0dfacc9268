"""python -m api_gateway"""

import asyncio

from api_gateway import app
from api_gateway.settings import GatewaySettings
from common.logging import configure_logging
from common.settings import load_settings


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging("api_gateway", settings.log_level)
    asyncio.run(app.run(settings))


if __name__ == "__main__":
    main()
