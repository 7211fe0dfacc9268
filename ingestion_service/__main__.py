"""python -m ingestion_service"""

import asyncio

from common.logging import configure_logging
from common.settings import load_settings
from ingestion_service import app
from ingestion_service.settings import IngestionSettings


def main() -> None:
    settings = load_settings(IngestionSettings)
    configure_logging("ingestion_service", settings.log_level)
    asyncio.run(app.run(settings))


if __name__ == "__main__":
    main()
