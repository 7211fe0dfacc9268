"""Benchmark of the whole platform in one run (make bench): a table, JSON and a JSON file.

    python -m scripts.bench all                      # about 5 minutes
    python -m scripts.bench all --quick              # about 1 minute, smaller figures
    python -m scripts.bench all --only broker,unary  # of broker, streaming, unary, devices
    python -m scripts.bench soak                     # 1M readings, RSS every 100k

Sections, in this order:
- broker: RabbitMQ's own limit for a real reading message in a quorum queue like
  billing.readings (aio-pika, then PerfTest): the baseline the others are compared with.
- streaming: readings/s accepted through SendReadings in batches of 100 and of 1,000 from
  several client processes; readings/s billed end to end for a bounded number.
- unary: SendReading with ghz at concurrency 1, 16 and 64; p99 at half the maximum rate.
- devices: readings/s accepted with the readings spread over 1k, 10k and 100k devices.
- soak (only when asked for): --soak-readings (1M) in rounds of a tenth, over 10k devices;
  the RSS of every service and what each has processed after every round, so that growth
  shows. The queues are not emptied between rounds: billing works through its backlog.
Then the peak RSS (VmHWM) of each service. Every figure names the load tool and the CPU
time (user+sys) that tool used, since on a small machine it competes with the services.

The services are those answering on --target (make dev). When nothing answers there, the
bench starts the four services itself on free ports under a bench topology prefix,
database and Redis key prefix, empties its own queues between figures (so one figure's
backlog does not load the next) and removes all of it at the end. A running stack is never
purged: its billing works through the bench's readings long after the bench ends.
Needs make services, and ghz and PerfTest (bash scripts/bench_tools.sh). ``soak`` takes the
same options, with ``--own-stack --only soak --output bench-soak.json`` as its defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from scripts import client_options as client
from scripts.bench.broker import aio_pika_baseline, perf_test
from scripts.bench.loaded import DEFAULT_BILLING_METRICS_URL, BenchStack
from scripts.bench.measure import listening
from scripts.bench.report import ratios, render_table, stream_figure_name
from scripts.bench.stack import Stack, server_url
from scripts.bench.stream import StreamPlan, billed_run, run_streams
from scripts.bench.unary import unary_section

SECTIONS = ("broker", "streaming", "unary", "devices")
# Streams of (readings per stream, readings per stream message): loggers that send one
# reading a message, and loggers that pack them in `readings`.
STREAM_SHAPES = ((100, 1), (1000, 1), (1000, 100), (10_000, 1000))
ON_REQUEST = ("soak",)  # long: run only when named in --only
SOAK_ROUNDS, SOAK_DEVICES = 10, 10_000


def machine() -> dict[str, Any]:
    """CPU, memory and load of this machine, from /proc."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    models = [
        ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")
    ]
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "cpu_model": models[0] if models else "?",
        "logical_cpus": os.cpu_count(),
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_1m_at_start": float(Path("/proc/loadavg").read_text().split()[0]),
    }


class Bench:
    """Runs the selected sections against one stack and gathers their figures."""

    def __init__(self, stack: BenchStack, token: str | None, opts: dict[str, Any]) -> None:
        self.stack = stack
        self.token = token
        self.opts = opts
        self.run_id = f"bench-{uuid.uuid4().hex[:6]}"
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    def section(self, name: str, work: Callable[[], Any]) -> None:
        """Run one section; a failure is recorded and the next section still runs."""
        typer.echo(f"[bench] {name} ...", err=True)
        began = time.monotonic()
        try:
            self.results[name] = work()
        except Exception as error:  # one broken tool must not cost the other figures
            self.errors[name] = f"{type(error).__name__}: {error}"
            typer.echo(f"[bench] {name} failed: {self.errors[name]}", err=True)
        typer.echo(f"[bench] {name} took {time.monotonic() - began:.0f} s", err=True)
        try:
            self.stack.purge()
        except Exception as error:  # the figures stand; the next ones may carry a backlog
            self.errors[f"{name} purge"] = f"{type(error).__name__}: {error}"

    def broker(self) -> dict[str, Any]:
        o, prefix = self.opts, f"{self.run_id}-"
        return {
            "aio_pika": asyncio.run(
                aio_pika_baseline(o["rabbitmq_url"], prefix, o["broker_messages"], 100, 100)
            ),
            "perf_test": perf_test(o["rabbitmq_url"], prefix, o["perf_test_s"], 100, 100),
        }

    def plan(
        self, readings: int, batch: int, devices: int, label: str, per_message: int = 1
    ) -> StreamPlan:
        return StreamPlan(
            target=self.stack.target,
            token=self.token,
            readings=readings,
            batch=batch,
            devices=devices,
            device_prefix=f"{self.run_id}-{label}",
            clients=self.opts["clients"],
            streams=self.opts["streams"],
            per_message=per_message,
        )

    def streaming(self) -> dict[str, Any]:
        o = self.opts
        billed = billed_run(
            self.plan(o["billed_readings"], 100, 1000, "billed"),
            self.stack.billed,
            self.stack.store_retries,
            o["billed_wait_s"],
        )
        self.stack.purge()
        figures = {"billed": billed}
        for batch, per_message in STREAM_SHAPES:
            cpu_before = self.stack.cpu_seconds()
            name = stream_figure_name(batch, per_message)
            # Packed streams go several times faster: more readings, for as long a run.
            readings = o["stream_readings"] if per_message == 1 else o["packed_readings"]
            figure = run_streams(
                self.plan(readings, batch, 1000, name.replace("_", ""), per_message)
            )
            cpu_after, accepted = self.stack.cpu_seconds(), max(figure["accepted"], 1)
            # Billing drains its backlog meanwhile: the MongoDB server's share is billing's work.
            figure["cpu_us_per_reading"] = {
                name: round((cpu_after[name] - cpu_before.get(name, 0.0)) / accepted * 1e6, 1)
                for name in cpu_after
            }
            figures[name] = figure
            self.stack.purge()
        return figures

    def unary(self) -> dict[str, Any]:
        flat_out = self.results.get("broker", {}).get("perf_test")
        broker_p99_us = (flat_out or {}).get("confirm_latency_us", {}).get("p99")
        figures = unary_section(
            self.stack.target,
            self.token,
            self.opts["unary_s"],
            self.run_id,
            broker_p99_us / 1000 if broker_p99_us else None,
        )
        if flat_out:
            figures["broker_paced"] = self.broker_paced(figures["runs"][-1]["rps_limit"])
        return figures

    def broker_paced(self, rate: int) -> dict[str, Any]:
        """The broker alone at the paced run's rate, one message a call, for as long.

        The p99 target's reference, PerfTest flat out, keeps at most 100 confirms
        outstanding: a pause of the broker delays those 100 of its ~100,000 messages and
        stays below its p99. Paced callers keep arriving during such a pause, and every
        one of them waits it out; so does PerfTest here, paced, with a window of a second's
        messages."""
        seconds = max(1, round(self.opts["unary_s"]))
        prefix = f"{self.run_id}-paced-"
        return perf_test(self.opts["rabbitmq_url"], prefix, seconds, max(100, rate), 100, rate)

    def devices(self) -> dict[str, Any]:
        figures = {}
        for devices in self.opts["device_counts"]:
            readings = max(self.opts["device_readings"], devices)  # every device at least once
            figures[str(devices)] = run_streams(self.plan(readings, 100, devices, f"d{devices}"))
            self.stack.purge()
        return figures

    def soak(self) -> dict[str, Any]:
        """Send the soak in rounds and read every service's RSS and progress after each."""
        per_round = self.opts["soak_readings"] // SOAK_ROUNDS
        minutes_per_round = -(-per_round // SOAK_DEVICES) + 1
        rounds = []
        for number in range(SOAK_ROUNDS):
            plan = self.plan(per_round, 1000, SOAK_DEVICES, "soak")
            # Each round's readings one stretch of time earlier: new readings, same devices.
            plan = replace(plan, max_s=600.0, earlier_s=number * minutes_per_round * 60.0)
            sent = run_streams(plan)
            rounds.append(
                {
                    "sent_total": per_round * (number + 1),
                    "accepted": sent["accepted"],
                    "accepted_per_s": sent["accepted_per_s"],
                    "errors": sent["errors"],
                    "billed_total": self.stack.billed(),
                    "rss_mib": {name: mem["rss_mib"] for name, mem in self.stack.memory().items()},
                }
            )
            typer.echo(f"[bench] soak round {number + 1}: {rounds[-1]}", err=True)
        billed = self._wait_billed(per_round * SOAK_ROUNDS)
        return {
            "devices": SOAK_DEVICES,
            "batch": 1000,
            "rounds": rounds,
            "billed": billed,
            **_growth(rounds),
        }

    def _wait_billed(self, readings: int, stall_s: float = 120) -> dict[str, Any]:
        """Wait until billing has billed every reading (or made no progress for
        ``stall_s``); then every service's RSS."""
        began = time.perf_counter()
        billed, changed_at = self.stack.billed(), time.perf_counter()
        while billed < readings and time.perf_counter() - changed_at < stall_s:
            time.sleep(2)
            now = self.stack.billed()
            if now != billed:
                billed, changed_at = now, time.perf_counter()
        figures = {
            "billed_total": billed,
            "all": billed >= readings,
            "after_last_round_s": round(time.perf_counter() - began, 1),
            "rss_mib": {name: mem["rss_mib"] for name, mem in self.stack.memory().items()},
        }
        typer.echo(f"[bench] soak billed: {figures}", err=True)
        return figures


def _growth(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each service's RSS growth over the second half of the soak, in %: the first half
    includes the warm-up (analytics fills its dedupe memory of ANALYTICS_DEDUPE_MAX_IDS)."""
    if len(rounds) < 2:
        return {}
    middle, end = rounds[len(rounds) // 2 - 1]["rss_mib"], rounds[-1]["rss_mib"]
    return {
        "rss_growth_pct_second_half": {
            service: round((end[service] - middle[service]) / middle[service] * 100, 1)
            for service in end
            if middle.get(service)
        }
    }


def run(opts: dict[str, Any], sections: list[str]) -> dict[str, Any]:
    """Find or start the stack, run the sections, measure memory, clean up."""
    started_at, began = datetime.now(UTC), time.monotonic()
    info = machine()
    token = opts["token"]
    own = opts["own_stack"] or not listening(opts["target"])
    if not own and not token:
        raise typer.BadParameter("the gateway needs a token: set GATEWAY_TOKEN (make bench does)")
    # One event loop owns the services' processes from start to stop; the sections run
    # their own loops (and processes) in between.
    with asyncio.Runner() as runner:
        if own:
            token = token or secrets.token_hex(32)
            why = "--own-stack" if opts["own_stack"] else f"nothing answers on {opts['target']}"
            typer.echo(f"[bench] {why}: starting the four services", err=True)
            stack = BenchStack.of(runner.run(start_stack(token, opts)))
        else:
            stack = BenchStack.running(
                opts["target"], opts["topology_prefix"], opts["billing_metrics_url"]
            )
        bench = Bench(stack, token, opts)
        try:
            for name in sections:
                bench.section(name, getattr(bench, name))
            bench.results["memory"] = stack.memory()
        finally:
            if stack.owned is not None:
                runner.run(stack.owned.stop())
                try:
                    runner.run(stack.owned.clean())
                except Exception as error:  # report, but keep the figures
                    bench.errors["cleanup"] = f"{type(error).__name__}: {error}"
                if bench.errors:
                    typer.echo(f"[bench] the services' logs are in {stack.owned.log_dir}", err=True)
                else:
                    shutil.rmtree(stack.owned.log_dir, ignore_errors=True)
    info["loadavg_1m_at_end"] = float(Path("/proc/loadavg").read_text().split()[0])
    return {
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - began, 1),
        "machine": info,
        "stack": {
            "own": own,
            "target": stack.target,
            "topology_prefix": stack.topology.prefix,
            "pids": stack.pids,
        },
        "options": {k: v for k, v in opts.items() if k != "token" and not k.endswith("_url")},
        **bench.results,
        "errors": bench.errors,
    }


async def start_stack(token: str, opts: dict[str, Any]) -> Stack:
    """The four services on free ports under a bench prefix; removed again if they fail."""
    prefix = f"bench{uuid.uuid4().hex[:6]}-"
    stack = Stack(
        prefix,
        log_dir=Path(tempfile.mkdtemp(prefix=f"{prefix}logs-")),
        admin_token=token,
        rabbitmq_url=opts["rabbitmq_url"],
        mongodb_url=opts["mongodb_url"],
        redis_url=opts["redis_url"],
        # The bench measures capacity: the global bucket (GATEWAY_GLOBAL_RATE_PER_S, 20,000
        # readings/s by default) is a limit a deployment chooses, and packed streams exceed it.
        settings={"GATEWAY_GLOBAL_RATE_PER_S": "0"},
    )
    try:
        await stack.start(timeout_s=90)
    except BaseException as error:
        await stack.stop()
        with contextlib.suppress(Exception):  # whatever it declared before failing
            await stack.clean()
        first_line = str(error).splitlines()[0] if str(error) else repr(error)
        raise RuntimeError(f"bench stack not up: {first_line}; logs in {stack.log_dir}") from None
    return stack


def main(
    target: client.Target = client.DEFAULT_TARGET,
    token: client.Token = None,
    quick: Annotated[bool, typer.Option(help="A smoke run of about a minute.")] = False,
    only: Annotated[
        str, typer.Option(help=f"Comma-separated sections of {','.join(SECTIONS)}.")
    ] = ",".join(SECTIONS),
    soak_readings: Annotated[
        int, typer.Option(min=SOAK_ROUNDS, help="Readings the soak section sends.")
    ] = 1_000_000,
    output: Annotated[Path, typer.Option(help="JSON file to write.")] = Path("bench-results.json"),
    own_stack: Annotated[
        bool, typer.Option(help="Start the services even when --target answers.")
    ] = False,
    billed_readings: Annotated[
        int | None, typer.Option(min=1, help="Readings for the billed figure [5000].")
    ] = None,
    billed_wait_s: Annotated[
        float | None, typer.Option(min=1, help="Wait for them to be billed at most [120 s].")
    ] = None,
    clients: Annotated[int, typer.Option(min=1, help="Streaming client processes.")] = 2,
    streams: Annotated[int, typer.Option(min=1, help="SendReadings in flight per client.")] = 4,
    topology_prefix: Annotated[str, typer.Option(help="A running stack's TOPOLOGY_PREFIX.")] = "",
    billing_metrics_url: Annotated[
        str, typer.Option(help="A running stack's billing /metrics.")
    ] = DEFAULT_BILLING_METRICS_URL,
) -> None:
    """Run the benchmark; print the table, then the JSON; exit 1 if a section failed."""
    sections = [s.strip() for s in only.split(",") if s.strip()]
    if unknown := set(sections) - set(SECTIONS + ON_REQUEST):
        raise typer.BadParameter(
            f"unknown sections {sorted(unknown)}; choose from {SECTIONS + ON_REQUEST}"
        )
    scale = {
        "broker_messages": 5_000 if quick else 20_000,
        "perf_test_s": 3 if quick else 10,
        "stream_readings": 5_000 if quick else 20_000,
        "packed_readings": 20_000 if quick else 100_000,
        "unary_s": 2 if quick else 6,
        "device_counts": (1_000, 10_000) if quick else (1_000, 10_000, 100_000),
        "device_readings": 5_000 if quick else 20_000,
        "billed_readings": billed_readings or (500 if quick else 5_000),
        "billed_wait_s": billed_wait_s or (20 if quick else 120),
        "soak_readings": soak_readings,
    }
    opts = {
        "target": target,
        "token": token,
        "quick": quick,
        "own_stack": own_stack,
        "clients": clients,
        "streams": streams,
        "topology_prefix": topology_prefix,
        "billing_metrics_url": billing_metrics_url,
        "rabbitmq_url": server_url("RABBITMQ_URL"),
        "mongodb_url": server_url("MONGODB_URL"),
        "redis_url": server_url("REDIS_URL"),
        **scale,
    }
    results = run(opts, [s for s in SECTIONS + ON_REQUEST if s in sections])
    results["ratios"] = ratios(results)
    results["table"] = render_table(results)
    output.write_text(json.dumps(results, indent=2) + "\n")
    typer.echo("\n".join(results["table"]))
    typer.echo(json.dumps(results))
    typer.echo(f"[bench] JSON written to {output}", err=True)
    raise typer.Exit(1 if results["errors"] else 0)
