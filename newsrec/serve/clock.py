"""The service's one notion of "now".

Dataset times are the world the models learned in; a service started on them lives after the
log's end. ``ServiceClock.now()`` is the dataset's reference time (the end of the log, or the
latest fresh news already added, whichever is later) advanced by the wall-clock time since the
service started. Fresh news get first-seen = ``now()`` and requests are scored at ``now()``, so a
fresh news' age starts at 0 and grows as the service runs, and time never runs backwards across a
restart.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable


class ServiceClock:
    """``now()``: seconds since the epoch, in the dataset's time (UTC)."""

    def __init__(self, start_seconds: float, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.start_seconds = float(start_seconds)
        self._monotonic = monotonic
        self._started = monotonic()

    def now(self) -> float:
        return self.start_seconds + (self._monotonic() - self._started)

    def now_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now(), tz=timezone.utc)

    @staticmethod
    def parse(text: str) -> float:
        """Seconds since the epoch of an ISO time written by ``now_datetime().isoformat()``
        (a naive time is UTC, as dataset times are)."""
        when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
