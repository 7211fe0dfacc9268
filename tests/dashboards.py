"""The provisioned Grafana dashboards, read for tests: files, panels and their PromQL queries.

Plain module (no pytest) so that other tests, e.g. one running every query against a real
Prometheus, can import it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GRAFANA_DIR = ROOT / "deployments" / "grafana"
DASHBOARDS_DIR = GRAFANA_DIR / "dashboards"
PROVISIONING_DIR = GRAFANA_DIR / "provisioning"
DATASOURCES_FILE = PROVISIONING_DIR / "datasources" / "prometheus.yml"
PROVIDERS_FILE = PROVISIONING_DIR / "dashboards" / "dashboards.yml"

DATASOURCE_UID = "prometheus"
# Where compose mounts deployments/grafana/dashboards inside the Grafana container.
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"
RATE_INTERVAL = "1m"  # what $__rate_interval stands for when the queries are run in tests

# Metric families the platform and its exporters expose (histograms by their _bucket series).
KNOWN_METRICS: frozenset[str] = frozenset(
    {
        # gRPC server (gateway, ingestion, billing) and client (gateway) metrics
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "grpc_client_handled_total",
        "grpc_client_handling_seconds_bucket",
        # every service
        "event_loop_lag_seconds_bucket",
        # api_gateway
        "gateway_readings_accepted_total",
        "gateway_readings_rejected_total",
        # ingestion_service
        "ingestion_published_total",
        "ingestion_publish_failures_total",
        "ingestion_published_messages_total",
        "gateway_unary_batch_readings_sum",
        "gateway_unary_batch_readings_count",
        "consumer_readings_total",
        "ingestion_confirm_seconds_bucket",
        "ingestion_publish_batch_size_bucket",
        # billing and analytics consumers
        "consumer_messages_total",
        "consumer_processing_seconds_bucket",
        "consumer_reading_lag_seconds_bucket",
        # billing_service
        "billing_readings_total",
        "billing_store_retries_total",
        "billing_cache_deferred_total",
        "billing_cache_stale_buckets",
        "billing_unregistered_readings_total",
        # analytics_service (business metrics)
        "energy_readings_total",
        "energy_duplicate_readings_total",
        "energy_received_kwh_total",
        "energy_active_devices",
        "energy_silent_devices",
        "energy_unregistered_devices",
        "energy_top_consumer_kwh",
        "energy_billed_amount",
        "fleet_peak_demand_kw",
        "fleet_peak_demand_slot_start_seconds",
        # RabbitMQ (rabbitmq_prometheus, per-object endpoint)
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages_unacked",
        "rabbitmq_queue_consumers",
        "rabbitmq_connections",
        "rabbitmq_channels",
        "rabbitmq_global_messages_received_total",
        "rabbitmq_global_messages_delivered_total",
        "rabbitmq_global_messages_confirmed_total",
        # Redis (redis_exporter)
        "redis_up",
        "redis_connected_clients",
        "redis_memory_used_bytes",
        "redis_commands_processed_total",
        "redis_keyspace_hits_total",
        "redis_keyspace_misses_total",
        # Prometheus itself
        "up",
    }
)

# PromQL words that look like identifiers but are not metric names.
PROMQL_WORDS: frozenset[str] = frozenset(
    {
        # aggregations and their modifiers
        "sum", "avg", "min", "max", "count", "stddev", "stdvar", "group", "topk", "bottomk",
        "quantile", "count_values", "limitk", "limit_ratio",
        "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
        "and", "or", "unless", "atan2",
        # functions
        "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max",
        "clamp_min", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta",
        "deriv", "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction",
        "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum",
        "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace",
        "ln", "log2", "log10", "minute", "month", "predict_linear", "rate", "resets", "round",
        "scalar", "sgn", "sort", "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt",
        "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time",
        "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
        "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
        # literals
        "inf", "nan",
    }
)  # fmt: skip

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][\w:]*")


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard file (name -> parsed JSON), sorted by name."""
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARDS_DIR.glob("*.json"))
    }


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard, rows included, with the panels nested in rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def query_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The panels that show data (everything but rows)."""
    return (panel for panel in iter_panels(dashboard) if panel.get("type") != "row")


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) for every target, with $__rate_interval set to 1m."""
    return [
        (
            dashboard["uid"],
            panel.get("title", ""),
            target.get("expr", "").replace("$__rate_interval", RATE_INTERVAL),
        )
        for dashboard in dashboards().values()
        for panel in query_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (PromQL words, labels and durations left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _RANGE.sub("[]", text)
    text = _GROUPING.sub(r"\1", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in PROMQL_WORDS}
