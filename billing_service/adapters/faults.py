"""Fault injection for tests of the promise: MongoDB writes that fail before they are sent.

Off unless BILLING_FAULTS_FILE names a file. While that file exists, every write fails as
the MongoDB driver's would ("timeout" or "refused", the file's content) and nothing reaches
the server; remove the file and writes go through again. A testing aid only: failures
injected here exercise billing's retries without racing a late copy of a write on the
server (see tests/faults).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from billing_service.domain.ledger import BatchRecorded, Ledger, TransientFailure
from common.models import Reading


class FaultyLedger:
    """A Ledger whose writes fail while the control file exists."""

    def __init__(self, inner: Ledger, control_file: Path) -> None:
        self._inner = inner
        self._control_file = control_file

    async def record_batch(self, readings: Sequence[Reading]) -> BatchRecorded:
        if self._control_file.exists():
            kind = self._control_file.read_text().strip() or "timeout"
            raise TransientFailure(f"MongoDB: injected {kind} (fault file {self._control_file})")
        return await self._inner.record_batch(readings)

    async def latest(self, device_id: str) -> Reading | None:
        return await self._inner.latest(device_id)
