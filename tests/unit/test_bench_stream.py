"""The bench's streams: every reading once, over the clients, one or many per message."""

from __future__ import annotations

import pytest

from common.energy.v1 import gateway_pb2
from scripts.bench.report import stream_figure_name
from scripts.bench.stream import StreamPlan, worker_batches


def plan(per_message: int) -> StreamPlan:
    return StreamPlan(
        target="127.0.0.1:1",
        token=None,
        readings=2_345,
        batch=1_000,
        devices=7,
        device_prefix="t",
        clients=2,
        per_message=per_message,
    )


@pytest.mark.parametrize("per_message", [1, 100, 1_000])
def test_every_reading_goes_once_in_messages_of_at_most_per_message(per_message: int) -> None:
    sent = []
    for worker in range(2):
        for count, messages in worker_batches(plan(per_message), worker, now=1_800_000_000):
            requests = [gateway_pb2.SendReadingRequest.FromString(m) for m in messages]
            if per_message == 1:
                readings = [r.reading for r in requests]
            else:
                assert all(not r.HasField("reading") for r in requests)
                assert all(len(r.readings) <= per_message for r in requests)
                readings = [reading for r in requests for reading in r.readings]
            assert count == len(readings) <= 1_000
            sent += [(r.device_id, r.timestamp.seconds) for r in readings]
    assert len(sent) == len(set(sent)) == 2_345


def test_figure_names() -> None:
    assert stream_figure_name(1000, 1) == "batch_1000"
    assert stream_figure_name(1000, 100) == "batch_1000_packed_100"
