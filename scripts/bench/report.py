"""The bench's results as a plain-text table (also kept in the JSON, under ``table``)."""

from __future__ import annotations

from typing import Any

COLUMNS = ("section", "figure", "value", "unit", "x broker", "load tool", "tool CPU s")
# The processes that accept a reading (billing and its store drain it later), and the
# target for their CPU per reading.
ACCEPTING = ("api_gateway", "ingestion_service", "rabbitmq", "analytics_service")
ACCEPTING_TARGET_US = 100
# Units of the figures compared with the broker's publish rate (aio-pika).
RATES = ("readings/s", "req/s")


class Rows:
    """Table rows; rates are also shown as a fraction of the broker's publish baseline."""

    def __init__(self, baseline_per_s: float) -> None:
        self.baseline = baseline_per_s
        self.rows: list[tuple[str, ...]] = []

    def add(
        self, section: str, figure: str, value: float, unit: str, tool: str, cpu_s: object = ""
    ) -> None:
        ratio = f"{value / self.baseline:.3f}" if self.baseline and unit in RATES else ""
        shown = f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
        self.rows.append((section, figure, shown, unit, ratio, tool, str(cpu_s)))


def _errors(figure: dict[str, Any]) -> str:
    errors = figure.get("errors") or {}
    return f"; errors {errors}" if errors else ""


def _broker(table: Rows, broker: dict[str, Any]) -> None:
    if aio := broker.get("aio_pika"):
        table.add(
            "broker",
            f"publish {aio['message_bytes']} B persistent, "
            f"{aio['confirm_window']} confirms in flight",
            aio["publish_per_s"],
            "msg/s",
            "aio-pika",
            aio["publish_loadgen_cpu_s"],
        )
        table.add(
            "broker",
            f"consume, ack multiple every {aio['ack_every']}",
            aio["consume_per_s"],
            "msg/s",
            "aio-pika",
            aio["consume_loadgen_cpu_s"],
        )
    if perf := broker.get("perf_test"):
        p99_ms = perf["confirm_latency_us"].get("p99", 0) / 1000
        table.add(
            "broker",
            f"publish+consume {perf['seconds']} s, confirm p99 {p99_ms:.1f} ms",
            perf["publish_per_s"],
            "msg/s",
            perf["tool"],
            f"{perf['loadgen_cpu_s']} incl. JVM",
        )
        table.add("broker", "consume, same run", perf["consume_per_s"], "msg/s", perf["tool"])


def stream_figure_name(batch: int, per_message: int) -> str:
    """``batch_1000``: one reading a stream message; ``batch_1000_packed_100``: 100 a message."""
    return f"batch_{batch}" + (f"_packed_{per_message}" if per_message > 1 else "")


def _shape(fig: dict[str, Any]) -> str:
    per_message = fig.get("per_message", 1)
    packed = f" packed {per_message:,} a message" if per_message > 1 else ", one a message"
    return f"batches of {fig['batch']:,}{packed}"


def _streaming(table: Rows, streaming: dict[str, Any]) -> None:
    for name, fig in streaming.items():
        if name.startswith("batch_"):
            batch = _shape(fig)
            table.add(
                "streaming",
                f"accepted, {batch}, {fig['accepted']:,} readings" + _errors(fig),
                fig["accepted_per_s"],
                "readings/s",
                fig["tool"],
                fig["loadgen_cpu_s"],
            )
            if cpu := fig.get("cpu_us_per_reading"):
                table.add(
                    "streaming",
                    f"CPU per reading, {batch}: "
                    + ", ".join(f"{name} {us:.0f}" for name, us in cpu.items()),
                    sum(cpu.values()),
                    "µs",
                    "/proc",
                )
                accepting = sum(cpu.get(name, 0.0) for name in ACCEPTING)
                table.add(
                    "streaming",
                    f"  of which accepting (gateway, ingestion, RabbitMQ, analytics): "
                    f"{'meets' if accepting <= ACCEPTING_TARGET_US else 'MISSES'} "
                    f"<= {ACCEPTING_TARGET_US} µs",
                    accepting,
                    "µs",
                    "/proc",
                )
    if fig := streaming.get("billed"):
        state = "all" if fig["complete"] else f"INCOMPLETE, {fig['wait_s']:g} s limit"
        table.add(
            "streaming",
            f"billed: {fig['billed']:,} of {fig['accepted']:,} ({state}), "
            f"{fig['elapsed_s']:.0f} s, {fig.get('store_retries', 0)} store retries",
            float(fig["billed_per_s"]),
            "readings/s",
            fig["tool"],
            fig["loadgen_cpu_s"],
        )


def _unary(table: Rows, runs: list[dict[str, Any]]) -> None:
    for fig in runs:
        latency = (
            f"p50/95/99 {fig.get('p50_ms', 0)}/{fig.get('p95_ms', 0)}/{fig.get('p99_ms', 0)} ms"
        )
        what = f"c={fig['concurrency']}, {latency}"
        if fig["rps_limit"]:
            verdict = "meets" if fig.get("meets_p99_target") else "MISSES"
            target_ms = fig.get("p99_target_ms", 10)
            what = (
                f"c={fig['concurrency']} --rps {fig['rps_limit']} (half), {latency}: "
                f"{verdict} p99 <= {target_ms:g} ms (2x the broker's confirm p99)"
            )
        table.add(
            "unary",
            what + _errors(fig),
            fig["ok_per_s"],
            "req/s",
            fig["tool"],
            fig["loadgen_cpu_s"],
        )


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each platform rate over the two broker publish baselines (aio-pika, PerfTest)."""
    broker = results.get("broker", {})
    bases = {
        "vs_aio_pika_publish": broker.get("aio_pika", {}).get("publish_per_s"),
        "vs_perf_test_publish": broker.get("perf_test", {}).get("publish_per_s"),
    }
    rates = {
        f"streaming.{name}": fig.get("billed_per_s", fig.get("accepted_per_s"))
        for name, fig in results.get("streaming", {}).items()
    }
    rates |= {
        f"devices.{n}": fig["accepted_per_s"] for n, fig in results.get("devices", {}).items()
    }
    for fig in results.get("unary", {}).get("runs", []):
        paced = f"_rps{fig['rps_limit']}" if fig["rps_limit"] else ""
        rates[f"unary.c{fig['concurrency']}{paced}"] = fig["ok_per_s"]
    return {
        name: {key: round(rate / base, 4) for key, base in bases.items() if base}
        for name, rate in rates.items()
        if rate is not None
    }


def rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per figure, in the order they were measured."""
    broker = results.get("broker", {})
    table = Rows(broker.get("aio_pika", {}).get("publish_per_s") or 0)
    _broker(table, broker)
    _streaming(table, results.get("streaming", {}))
    _unary(table, results.get("unary", {}).get("runs", []))
    if paced := results.get("unary", {}).get("broker_paced"):
        latency = paced["confirm_latency_us"]
        table.add(
            "unary",
            f"  the broker alone at that rate ({paced['seconds']} s, one message a call, "
            f"{paced['confirm_window']} confirms in flight): confirm p50/95/99 "
            + "/".join(f"{latency.get(q, 0) / 1000:.1f}" for q in ("p50", "p95", "p99"))
            + " ms",
            paced["publish_per_s"],
            "msg/s",
            paced["tool"],
            paced["loadgen_cpu_s"],
        )
    for devices, fig in results.get("devices", {}).items():
        table.add(
            "devices",
            f"{int(devices):,} devices, {fig['accepted']:,} readings, batches of {fig['batch']}"
            + _errors(fig),
            fig["accepted_per_s"],
            "readings/s",
            fig["tool"],
            fig["loadgen_cpu_s"],
        )
    _soak(table, results.get("soak", {}))
    for service, memory in results.get("memory", {}).items():
        table.add(
            "memory",
            f"{service} peak RSS (VmHWM), now {memory['rss_mib']:.0f} MiB",
            memory["peak_rss_mib"],
            "MiB",
            "/proc",
        )
    return table.rows


def _soak(table: Rows, soak: dict[str, Any]) -> None:
    """Each service's RSS after the first round, at half-way and at the end of the soak."""
    rounds = soak.get("rounds") or []
    if not rounds:
        return
    first, middle, end = rounds[0], rounds[len(rounds) // 2 - 1], rounds[-1]
    table.add(
        "soak",
        f"{end['sent_total']:,} readings over {soak['devices']:,} devices, batches of "
        f"{soak['batch']}; billed by the end {int(end['billed_total']):,}",
        sum(r["accepted_per_s"] for r in rounds) / len(rounds),
        "readings/s",
        "grpc.aio",
    )
    billed = soak.get("billed")
    if billed:
        table.add(
            "soak",
            f"billed {int(billed['billed_total']):,} ({'all' if billed['all'] else 'NOT all'}), "
            f"{billed['after_last_round_s']:g} s after the last round; billing RSS then "
            f"{billed['rss_mib'].get('billing_service', 0):.0f} MiB",
            billed["billed_total"],
            "readings",
            "/metrics",
        )
    growth = soak.get("rss_growth_pct_second_half", {})
    for service, rss in end["rss_mib"].items():
        table.add(
            "soak",
            f"{service} RSS after {first['sent_total']:,} / {middle['sent_total']:,} / "
            f"{end['sent_total']:,}: {first['rss_mib'].get(service, 0):.0f} / "
            f"{middle['rss_mib'].get(service, 0):.0f} / {rss:.0f} MiB; "
            f"second half {growth.get(service, 0):+.1f}%",
            rss,
            "MiB",
            "/proc",
        )


def render_table(results: dict[str, Any]) -> list[str]:
    """The header (machine, stack) and the aligned table, as lines."""
    m, stack = results["machine"], results["stack"]
    rabbit = results.get("broker", {}).get("aio_pika", {}).get("rabbitmq_version", "?")
    where = (
        f"started by the bench (prefix {stack['topology_prefix']}; its own queues emptied "
        "between figures; the gateway's global rate limit off)"
        if stack["own"]
        else f"already running at {stack['target']} (its queues keep the bench's readings; "
        "its rate limits apply)"
    )
    lines = [
        f"make bench {results['started_at']} ({results['duration_s']:.0f} s)",
        f"machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, {m['ram_gib']} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}, RabbitMQ {rabbit}",
        f"1-minute load average: {m['loadavg_1m_at_start']} at start, "
        f"{m.get('loadavg_1m_at_end', '?')} at end",
        f"services: {where}",
        "x broker: the rate over the broker's own publish rate (aio-pika row); tool CPU s: "
        "user+sys CPU time of the load tool during that figure",
        "",
    ]
    table = [COLUMNS, *rows(results)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    right = {2, 4, 6}
    for index, row in enumerate(table):
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    for section, error in results.get("errors", {}).items():
        lines.append(f"FAILED {section}: {error.splitlines()[0] if error else ''}")
    return lines
