"""How many readings may wait for RabbitMQ's confirms at once, and when to come back.

A broker that confirms slower than readings arrive would otherwise let every caller wait
until its deadline: the wait for a confirm grows with the readings in flight (about their
number divided by the confirm rate; 4,000 readings on a broker confirming 900 a second
took 3.3 s per batch). With a bound the wait stays short, and a caller beyond it is told
at once to come back later, with a hint of when.
"""

from __future__ import annotations

from dataclasses import dataclass

# The hint before any publish has been confirmed, and its bounds: at least 50 ms, so that
# refused callers do not come straight back, at most the longest a confirm may take.
INITIAL_RETRY_AFTER_S = 0.1
MIN_RETRY_AFTER_S = 0.05
# Weight of the newest confirm latency in the running average: a few publishes move it.
LATENCY_WEIGHT = 0.2


@dataclass
class InFlightReadings:
    """Readings published but not yet confirmed, at most ``limit``, and the recent time
    a publish took to be confirmed.

    A publish larger than ``limit`` is still admitted when nothing else is in flight, so
    that any batch the gateway may forward can go through, alone.
    """

    limit: int
    max_retry_after_s: float
    count: int = 0
    confirm_latency_s: float = INITIAL_RETRY_AFTER_S

    def take(self, readings: int) -> bool:
        """Count ``readings`` in flight and return True, or False if they would exceed the
        limit (then nothing is counted)."""
        if self.count and self.count + readings > self.limit:
            return False
        self.count += readings
        return True

    def release(self, readings: int) -> None:
        """``readings`` are settled: confirmed, refused, or given up on."""
        self.count -= readings

    def confirmed_after(self, latency_s: float) -> None:
        """A publish was confirmed ``latency_s`` after it started."""
        self.confirm_latency_s += LATENCY_WEIGHT * (latency_s - self.confirm_latency_s)

    @property
    def retry_after_s(self) -> float:
        """When a refused caller should come back: about the time a publish now waits for
        its confirms, by when the readings in flight now are settled and room is free."""
        return min(self.max_retry_after_s, max(MIN_RETRY_AFTER_S, self.confirm_latency_s))
