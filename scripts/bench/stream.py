"""Streaming load for the bench: SendReadings from several client processes.

Each client process (``multiprocessing``, spawned) has its own channel and keeps
``streams`` SendReadings calls in flight. Before the common start (a barrier) every process
builds and serialises its readings, so the measured time is sending only and its CPU time
is that of the sending alone. Readings are spread over ``devices`` device ids
(``PREFIX-00000``...), one minute apart per device, all in the past, so every reading is a
new one for billing.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import queue
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any

import grpc

from common.energy.v1 import gateway_pb2, reading_pb2
from common.gateway_client import gateway_channel
from scripts.client_options import resend_delay_s, should_resend

SEND_READINGS = "/energy.v1.Gateway/SendReadings"
# A refused stream's first wait when the server gives no retry hint; doubled up to 1 s.
RESEND_BACKOFF_S = 0.05
# Straight to the gateway, never through a proxy named by http_proxy.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


@dataclass(frozen=True)
class StreamPlan:
    """One measurement: ``readings`` in streams of ``batch`` over ``devices`` devices."""

    target: str
    token: str | None
    readings: int
    batch: int
    devices: int
    device_prefix: str
    clients: int = 2
    streams: int = 4
    max_s: float = 60.0
    timeout_s: float = 60.0
    earlier_s: float = 0.0  # move every timestamp back this far (a soak's later rounds)
    per_message: int = 1  # readings per stream message: more than 1 packs them in `readings`


# A stream's serialised requests, with the number of readings they carry.
Batch = tuple[int, list[bytes]]


def worker_batches(plan: StreamPlan, worker: int, now: float) -> list[Batch]:
    """The serialised SendReadingRequests of the batches client ``worker`` sends: one
    reading each, or ``per_message`` of them packed in ``readings``.

    Reading ``i`` belongs to device ``i % devices`` and its round ``i // devices`` sets the
    timestamp; batch ``k`` holds readings ``k*batch ...`` and goes to client ``k % clients``.
    """
    rounds = math.ceil(plan.readings / plan.devices)
    first_s = (int(now) // 60 - rounds - 60) * 60  # the last round ends an hour ago
    ids = [f"{plan.device_prefix}-{d:05d}" for d in range(plan.devices)]
    batches = []
    for k in range(worker, math.ceil(plan.readings / plan.batch), plan.clients):
        readings = []
        for i in range(k * plan.batch, min((k + 1) * plan.batch, plan.readings)):
            reading = reading_pb2.Reading(device_id=ids[i % plan.devices], usage_kwh=0.01)
            reading.timestamp.seconds = first_s + (i // plan.devices) * 60
            readings.append(reading)
        if plan.per_message == 1:
            requests = [gateway_pb2.SendReadingRequest(reading=r) for r in readings]
        else:
            requests = [
                gateway_pb2.SendReadingRequest(readings=readings[j : j + plan.per_message])
                for j in range(0, len(readings), plan.per_message)
            ]
        batches.append((len(readings), [request.SerializeToString() for request in requests]))
    return batches


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _send(
    plan: StreamPlan, batches: list[Batch], started: Callable[[], None]
) -> dict[str, Any]:
    result: dict[str, Any] = {"accepted": 0, "rejected": 0, "sent": 0, "resent": 0, "errors": {}}
    first_error: dict[str, str] = {}
    async with gateway_channel(plan.target, plan.token, CHANNEL_OPTIONS) as channel:
        # Requests are serialised already: no serializer, the bytes go out as they are.
        call = channel.stream_unary(
            SEND_READINGS, response_deserializer=gateway_pb2.SendReadingsResponse.FromString
        )
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        started()  # returns when every client is ready
        cpu, began = _cpu_s(), time.monotonic()
        pending = iter(batches)

        async def stream() -> None:
            for readings, batch in pending:
                if time.monotonic() - began > plan.max_s:
                    return
                result["sent"] += readings
                reply = await send_resending(readings, batch)
                if reply is not None:
                    result["accepted"] += reply.accepted
                    result["rejected"] += reply.rejected_count

        async def send_resending(
            readings: int, batch: list[bytes]
        ) -> gateway_pb2.SendReadingsResponse | None:
            """As a logger does: a stream refused under backpressure is resent after the
            server's retry hint (else a short backoff) while the run lasts."""
            backoff_s = RESEND_BACKOFF_S
            while True:
                try:
                    return await call(iter(batch), timeout=plan.timeout_s)
                except grpc.aio.AioRpcError as error:
                    if should_resend(error) and time.monotonic() - began < plan.max_s:
                        result["resent"] += 1
                        await asyncio.sleep(resend_delay_s(error, backoff_s))
                        backoff_s = min(2 * backoff_s, 1.0)
                        continue
                    code = error.code().name
                    result["errors"][code] = result["errors"].get(code, 0) + readings
                    first_error.setdefault(code, error.details() or "")
                    return None

        await asyncio.gather(*(stream() for _ in range(plan.streams)))
        result["ended"] = time.monotonic()
        result["cpu_s"] = _cpu_s() - cpu
    result["first_error"] = first_error
    return result


def _client(
    plan: StreamPlan, worker: int, now: float, start: Any, messages: Queue[dict[str, Any]]
) -> None:
    """One client process: build its batches, say ready, wait for the start, send, report."""

    def ready() -> None:
        messages.put({"ready": worker})
        if not start.wait(timeout=300):
            raise TimeoutError("no start signal")

    try:
        batches = worker_batches(plan, worker, now)
        messages.put(asyncio.run(_send(plan, batches, ready)))
    except BaseException as error:  # reported to the parent, which fails the figure
        messages.put({"failed": f"client {worker}: {error!r}"})


def _collect(
    clients: list[BaseProcess],
    messages: Queue[dict[str, Any]],
    timeout_s: float,
) -> list[dict[str, Any]]:
    """One message from each client; fail at once when one reports a failure or dies."""
    answers: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(answers) < len(clients):
        try:
            answer = messages.get(timeout=0.5)
        except queue.Empty:
            if dead := [c.exitcode for c in clients if c.exitcode not in (None, 0)]:
                raise RuntimeError(f"a client process exited {dead[0]}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"clients did not answer within {timeout_s} s") from None
            continue
        if "failed" in answer:
            raise RuntimeError(answer["failed"])
        answers.append(answer)
    return answers


def run_streams(plan: StreamPlan) -> dict[str, Any]:
    """Send the plan from ``plan.clients`` processes; accepted readings/s over the run.

    ``elapsed_s`` runs from the common start to the last client's last answer; the CPU time
    is that of the clients while sending (user+sys, from getrusage in each).
    """
    context = multiprocessing.get_context("spawn")  # grpc's threads do not survive fork
    start = context.Event()
    messages: Queue[dict[str, Any]] = context.Queue()
    now = time.time() - plan.earlier_s
    clients = [
        context.Process(target=_client, args=(plan, w, now, start, messages), daemon=True)
        for w in range(plan.clients)
    ]
    for client in clients:
        client.start()
    try:
        _collect(clients, messages, timeout_s=180)  # built their readings, connected
        start.set()
        began = time.monotonic()
        answers = _collect(clients, messages, timeout_s=plan.max_s + plan.timeout_s + 60)
    finally:
        start.set()
        for client in clients:
            client.join(timeout=10)
            if client.is_alive():
                client.kill()
    elapsed = max(a["ended"] for a in answers) - began
    accepted = sum(a["accepted"] for a in answers)
    errors: dict[str, int] = {}
    first_error: dict[str, str] = {}
    for answer in answers:
        for code, count in answer["errors"].items():
            errors[code] = errors.get(code, 0) + count
        for code, detail in answer["first_error"].items():
            first_error.setdefault(code, detail)
    return {
        **{k: v for k, v in asdict(plan).items() if k not in ("target", "token")},
        "tool": f"grpc.aio {plan.clients} procs x {plan.streams}",
        "sent": sum(a["sent"] for a in answers),
        "resent_streams": sum(a["resent"] for a in answers),
        "accepted": accepted,
        "rejected": sum(a["rejected"] for a in answers),
        "errors": errors,
        "first_error": first_error,
        "elapsed_s": round(elapsed, 3),
        "accepted_per_s": round(accepted / elapsed) if elapsed > 0 else 0,
        "loadgen_cpu_s": round(sum(a["cpu_s"] for a in answers), 2),
    }


def billed_run(
    plan: StreamPlan,
    billed: Callable[[], float],
    retries: Callable[[], float],
    wait_s: float,
    poll_s: float = 0.5,
) -> dict[str, Any]:
    """Send the plan, then poll the billed counter until it grew by every accepted reading
    or ``wait_s`` passed; the rate runs from the first send to the last count seen.
    Billing's store retries over the same time tell a stall from a steady pace."""
    before, retries_before = billed(), retries()
    began = time.monotonic()
    sent = run_streams(plan)
    target, last_count, last_at = sent["accepted"], 0.0, began
    deadline = time.monotonic() + wait_s
    while True:
        count = billed() - before
        if count > last_count:
            last_count, last_at = count, time.monotonic()
        if last_count >= target or time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    elapsed = last_at - began
    return {
        "tool": sent["tool"],
        "readings": plan.readings,
        "accepted": target,
        "accepted_per_s": sent["accepted_per_s"],
        "billed": int(last_count),
        "complete": last_count >= target,
        "wait_s": wait_s,
        "elapsed_s": round(elapsed, 3),
        "billed_per_s": round(last_count / elapsed, 1) if elapsed > 0 else 0.0,
        "store_retries": int(retries() - retries_before),
        "loadgen_cpu_s": sent["loadgen_cpu_s"],
        "errors": sent["errors"],
    }
