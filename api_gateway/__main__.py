"""python -m api_gateway"""

from api_gateway import app
from api_gateway.settings import GatewaySettings
from common.logging import configure_logging
from common.loop import run
from common.settings import load_settings


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging("api_gateway", settings.log_level, settings.log_format)
    run(app.run(settings), settings.event_loop)


if __name__ == "__main__":
    main()
