"""Composition root of analytics_service: the consumer and /metrics."""

from __future__ import annotations

import logging

from analytics_service.consumer import AnalyticsHandler
from analytics_service.domain.tally import Tally
from analytics_service.settings import AnalyticsSettings
from common.consumer import ReadingConsumer
from common.grpc_server import wait_for_termination_signal
from common.metrics import serve_metrics
from common.rabbit import Topology

log = logging.getLogger(__name__)


async def run(settings: AnalyticsSettings) -> None:
    serve_metrics(settings.host, settings.metrics_port)
    topology = Topology(settings.topology_prefix)
    tally = Tally(settings.dedupe_window_s, settings.dedupe_max_ids, settings.active_window_s)
    consumer = ReadingConsumer(
        "analytics",
        settings.rabbitmq_url,
        topology,
        topology.analytics_queue,
        AnalyticsHandler(tally),
        settings.prefetch,
        settings.limits,
    )
    await consumer.start()
    log.info("analytics consuming", extra={"metrics_port": settings.metrics_port})
    await wait_for_termination_signal()
    await consumer.stop(settings.shutdown_grace_s)
