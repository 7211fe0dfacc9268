"""A connection attempt stopped half-way leaves nothing running: ``aio_pika.connect_robust``
cancelled while it connects drops its connection unclosed, whose reconnect loop then runs
on with no owner (and a later garbage collection warns "coroutine 'RobustConnection.close'
was never awaited")."""

from __future__ import annotations

import asyncio
import socket

import pytest

from common.rabbit import connect


async def test_a_cancelled_attempt_leaves_no_reconnect_loop_behind() -> None:
    with socket.socket() as silent:  # takes the TCP connection, never speaks AMQP
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        attempt = asyncio.create_task(connect(f"amqp://guest:guest@127.0.0.1:{port}/"))
        await asyncio.sleep(0.3)  # connecting: waiting for the broker's first frame
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
    await asyncio.sleep(0)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
