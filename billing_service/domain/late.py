"""Late writes: which issued months a reading may have changed since a bill last saw them.

An open bill carries an adjustment for every issued month whose slots changed after its
bill was issued. Recomputing every issued month on every read grows with the account's
age (about 37 ms a month per device here, 15-minute readings), so billing marks the writes
that can change an issued month, and readers recompute only the months those marks touch.

- A month is closed no earlier than ``CLOSE_AFTER_END`` after it ends (closing.py).
- A write is *late* when it comes ``LATE_AFTER`` or more after the earliest instant at
  which the local month holding its slot can end, in any time zone (UTC-12 to UTC+14;
  billing's clock). Billing marks the slot's UTC day with the write's time, before it
  writes the slot. Readings caught up within their month are not late: the marks stay few.
- Every write that can land after a close is late: a close comes ``CLOSE_AFTER_END`` after
  the month's end. ``MARGIN``, the difference, absorbs clock skew between billing and the
  closer and the time a write spends in flight.
- So a bill issued at ``seen_at`` saw every slot of a month as it is now, unless a mark on a
  day of that month is no older than ``seen_at - MARGIN``.

Marks are only known to be complete from some time after the first billing that writes
them started (``reliable_from``): a month last seen before then is always recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from billing_service.domain.ledger import SlotKey
from common.slots import SLOT

LATE_AFTER = timedelta(minutes=15)
CLOSE_AFTER_END = timedelta(hours=1)
MARGIN = CLOSE_AFTER_END - LATE_AFTER
# Billing processes of an older version write no marks: a rolling upgrade has this long.
ROLLOUT = timedelta(days=1)
DAY = timedelta(days=1)


# The widest UTC offsets of any time zone: local months end from 14 h before to 12 h after
# the UTC month's end.
EAST, WEST = timedelta(hours=14), timedelta(hours=12)


def late_days(slots: Iterable[SlotKey], now: datetime) -> set[tuple[str, datetime]]:
    """(device, UTC day start) of each slot written ``LATE_AFTER`` or more after the
    earliest end of its local month."""
    late_at: dict[datetime, bool] = {}  # by slot start: a batch's slots share a few
    days = set()
    for slot in slots:
        late = late_at.get(slot.start)
        if late is None:
            late = late_at[slot.start] = earliest_month_end(slot.start + SLOT) + LATE_AFTER <= now
        if late:
            days.add((slot.device_id, slot.start.replace(hour=0, minute=0)))
    return days


def earliest_month_end(slot_end: datetime) -> datetime:
    """No later than the end of the local month holding the slot that ends at ``slot_end``,
    in any time zone. A zone at offset ``o`` ends its months at the UTC month boundaries
    ``B`` minus ``o``, the first one at or after ``slot_end``; over every offset in
    [-WEST, EAST] that is at least max(B - EAST, slot_end) for the first ``B`` at or after
    slot_end - WEST."""
    boundary = _first_month_start_from(slot_end - WEST)
    return max(boundary - EAST, slot_end)


def _first_month_start_from(instant: datetime) -> datetime:
    start = instant.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start if start == instant else (start + timedelta(days=32)).replace(day=1)


@dataclass(frozen=True)
class LateWrites:
    """A device's marks: the latest late write into each UTC day (by the day's start).

    ``reliable_from``: from when the marks hold every late write (None: never known to)."""

    reliable_from: datetime | None
    days: Mapping[datetime, datetime]

    @classmethod
    def marked_since(cls, since: datetime | None, days: Mapping[datetime, datetime]) -> LateWrites:
        """Marks written since ``since`` (None: no billing has written any)."""
        return cls(None if since is None else since + ROLLOUT, days)

    def may_have_changed(self, start: datetime, end: datetime, seen_at: datetime) -> bool:
        """Whether a slot in [start, end) may have been written after a bill issued at
        ``seen_at`` read it."""
        since = seen_at - MARGIN
        if self.reliable_from is None or since < self.reliable_from:
            return True
        return any(at >= since and day < end and day + DAY > start for day, at in self.days.items())


ALWAYS_CHANGED = LateWrites(reliable_from=None, days={})
