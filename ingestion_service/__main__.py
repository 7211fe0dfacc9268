"""python -m ingestion_service"""

from common.logging import configure_logging
from common.loop import run
from common.settings import load_settings
from ingestion_service import app
from ingestion_service.settings import IngestionSettings


def main() -> None:
    settings = load_settings(IngestionSettings)
    configure_logging("ingestion_service", settings.log_level, settings.log_format)
    run(app.run(settings), settings.event_loop)


if __name__ == "__main__":
    main()
