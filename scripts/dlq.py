"""Dead-lettered messages: list them with their reasons, replay the ones whose cause is fixed.

    python -m scripts.dlq list                 # make dlq
    python -m scripts.dlq replay ID [ID ...]   # make dlq-replay IDS="..."
    python -m scripts.dlq replay --all

Dead letters are of both message versions: a whole message that could not be read (a
version-2 one is listed with its batch id and how many readings it holds), or one invalid
reading of a batch, dead-lettered alone as a version-1 message whose id is its reading id,
with the batch it came from in ``x-batch-id``. Both replay as they are: consumers accept
either version.

Listing takes every message off the dead-letter queue without acknowledging it and
closes the channel, so the broker puts them all back. Replaying publishes a chosen message
to the readings exchange with a publisher confirm, and only then acknowledges it: a crash
in between leaves it in both places, and billing's idempotency makes that harmless.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated

import aio_pika
import typer
from aio_pika.abc import AbstractIncomingMessage

from common.consumer import BATCH_ID_HEADER, ORIGINAL_QUEUE_HEADER
from common.messages import BATCH_SCHEMA_VERSION, SCHEMA_VERSION
from common.rabbit import (
    REASON_HEADER,
    ROUTING_KEY,
    DeclaredTopology,
    Topology,
    declare_topology,
    persistent_copy,
)
from common.settings import BrokerSettings, load_settings

app = typer.Typer(add_completion=False, help=__doc__)
# Added by dead-lettering (ours and the broker's); a replayed message goes without them.
DEAD_LETTER_HEADERS = (REASON_HEADER, ORIGINAL_QUEUE_HEADER, BATCH_ID_HEADER, "x-death")


Handle = Callable[[DeclaredTopology, list[AbstractIncomingMessage]], Awaitable[None]]


async def _dead_letters(
    settings: BrokerSettings, handle: Handle, limit: int
) -> list[AbstractIncomingMessage]:
    """Call ``handle(channel, declared, messages)`` with up to ``limit`` dead letters."""
    connection = await aio_pika.connect(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        declared = await declare_topology(channel, Topology(settings.topology_prefix))
        queue = declared.queues[Topology(settings.topology_prefix).dead_letter_queue]
        messages: list[AbstractIncomingMessage] = []
        while len(messages) < limit:
            message = await queue.get(no_ack=False, fail=False, timeout=10)
            if message is None:
                break
            messages.append(message)
        await handle(declared, messages)
        return messages


def _describe(message: AbstractIncomingMessage) -> dict[str, object]:
    headers = message.headers or {}
    reason = headers.get(REASON_HEADER)
    if reason is None and headers.get("x-death"):  # dead-lettered by the broker itself
        death = headers["x-death"][0]  # type: ignore[index]
        reason = f"broker: {death.get('reason')} from {death.get('queue')}"  # type: ignore[union-attr]
    return {
        "message_id": message.message_id,
        "reason": str(reason),
        "queue": str(headers.get(ORIGINAL_QUEUE_HEADER, "")),
        "from_batch": str(headers.get(BATCH_ID_HEADER, "")),
        "holds": _holds(message.body),
        "body": message.body[:200].decode(errors="replace"),
    }


def _holds(body: bytes) -> str:
    """What a dead letter carries, in a few words: one reading, or a batch and its size."""
    try:
        data = json.loads(body)  # json, not orjson: it reads the NaN a reason may be about
    except (ValueError, RecursionError):
        return "not JSON"
    if not isinstance(data, dict):
        return "not a JSON object"
    version = data.get("schema_version")
    if version == BATCH_SCHEMA_VERSION:
        readings = data.get("readings")
        size = len(readings) if isinstance(readings, list) else "no list of"
        return f"batch {data.get('batch_id')!r} of {size} readings"
    if version == SCHEMA_VERSION:
        return f"reading {data.get('reading_id')!r}"
    return f"schema_version {version!r}"


@app.command("list")
def list_(
    limit: Annotated[int, typer.Option(help="show at most this many")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object a line")] = False,
) -> None:
    """Show the dead-lettered messages and why; they all stay in the queue."""
    settings = load_settings(BrokerSettings)

    async def leave(_declared: DeclaredTopology, _messages: list[AbstractIncomingMessage]) -> None:
        return None  # closing the channel returns them all

    messages = asyncio.run(_dead_letters(settings, leave, limit))
    for message in messages:
        described = _describe(message)
        if as_json:
            typer.echo(json.dumps(described))
        else:
            origin = f" (from batch {described['from_batch']})" if described["from_batch"] else ""
            typer.echo(
                f"{described['message_id']}  {described['reason']}\n"
                f"    {described['holds']}{origin}: {described['body']}"
            )
    typer.echo(f"{len(messages)} dead-lettered message(s)", err=True)


@app.command()
def replay(
    ids: Annotated[list[str] | None, typer.Argument(help="message ids to replay")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="replay every message")] = False,
) -> None:
    """Publish chosen dead letters back to the readings exchange, then remove them."""
    if not ids and not replay_all:
        raise typer.BadParameter("name the message ids to replay, or pass --all")
    wanted = set(ids or [])
    settings = load_settings(BrokerSettings)
    replayed: list[str] = []

    async def send_back(
        declared: DeclaredTopology, messages: list[AbstractIncomingMessage]
    ) -> None:
        for message in messages:
            if replay_all or message.message_id in wanted:
                headers = {
                    k: v for k, v in (message.headers or {}).items() if k not in DEAD_LETTER_HEADERS
                }
                await declared.exchange.publish(
                    persistent_copy(message, headers), routing_key=ROUTING_KEY
                )
                await message.ack()
                replayed.append(str(message.message_id))

    asyncio.run(_dead_letters(settings, send_back, limit=1_000_000))
    typer.echo(f"replayed {len(replayed)} message(s): {' '.join(replayed)}")
    missing = wanted - set(replayed)
    if missing:
        typer.echo(f"not in the dead-letter queue: {' '.join(sorted(missing))}", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
