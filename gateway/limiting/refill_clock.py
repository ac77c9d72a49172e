"""The one refill clock per process.

It owns "now" for every bucket. For each distinct ``refill_period`` in the
config it keeps a ``Ticker`` whose ``count`` is the number of whole periods
since the clock's epoch; one background task wakes at the next period boundary
(or once a second, whichever is first) and advances the counts. Buckets
remember the count they were last brought up to date at and add what they are
owed when touched (``bucket.refill``), so a tick costs O(number of distinct
periods), never O(number of clients).

Counts are derived from the time of waking, not incremented, so a late wake-up
(a busy loop) delays a refill by the lateness but never loses one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Final

__all__ = ["ManualRefillClock", "RefillClock", "Ticker"]

log = logging.getLogger("gateway.refill_clock")

# The coarse clock (idle eviction, "seen") needs no better resolution.
MAX_WAKE_INTERVAL_SECONDS: Final = 1.0


def _whole_periods(elapsed: float, period_seconds: float) -> int:
    # The epsilon keeps 10 x 0.1 s from counting 9 periods: float sums of
    # periods land a hair under the boundary they name.
    return math.floor(elapsed / period_seconds + 1e-9)


class Ticker:
    """Whole refill periods elapsed for one ``period_seconds``."""

    __slots__ = ("count", "next_at", "period_seconds")

    def __init__(self, period_seconds: float, count: int, next_at: float) -> None:
        self.period_seconds = period_seconds
        self.count = count
        self.next_at = next_at


class RefillClock:
    """Background clock driving every bucket's refill; see the module docstring."""

    def __init__(self) -> None:
        self._epoch = self.now()
        self._tickers: dict[float, Ticker] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._on_second: list[Callable[[int], None]] = []
        self.seconds = 0  # whole seconds since the epoch, for idle bookkeeping

    def now(self) -> float:
        return time.monotonic()

    def ticker(self, period_seconds: float) -> Ticker:
        """The ticker for ``period_seconds``, created on first use."""
        ticker = self._tickers.get(period_seconds)
        if ticker is None:
            count = _whole_periods(self.now() - self._epoch, period_seconds)
            ticker = Ticker(period_seconds, count, self._epoch + (count + 1) * period_seconds)
            self._tickers[period_seconds] = ticker
            self._wake.set()  # the loop may need to wake sooner now
        return ticker

    def seconds_to_next(self, ticker: Ticker) -> float:
        """Seconds until ``ticker`` next counts (0 when overdue)."""
        remaining = ticker.next_at - self.now()
        return remaining if remaining > 0 else 0.0

    def on_second(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(seconds)`` about once a second (idle eviction)."""
        self._on_second.append(callback)

    def advance_to(self, now: float) -> None:
        """Bring every ticker up to ``now``."""
        elapsed = now - self._epoch
        for ticker in self._tickers.values():
            count = _whole_periods(elapsed, ticker.period_seconds)
            if count > ticker.count:
                ticker.count = count
                ticker.next_at = self._epoch + (count + 1) * ticker.period_seconds
        seconds = math.floor(elapsed)
        if seconds != self.seconds:
            self.seconds = seconds
            for callback in self._on_second:
                try:
                    callback(seconds)
                except Exception:
                    log.exception("refill clock: a per-second callback failed")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="refill-clock")

    async def stop(self) -> None:
        """Stop by event (no cancellation mid-tick), then wait for the task."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stopping:
            now = self.now()
            self.advance_to(now)
            next_at = min(
                (t.next_at for t in self._tickers.values()),
                default=now + MAX_WAKE_INTERVAL_SECONDS,
            )
            delay = min(next_at - now, MAX_WAKE_INTERVAL_SECONDS)
            self._wake.clear()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)


class ManualRefillClock(RefillClock):
    """A clock that moves only when a test calls ``advance``. Everything else
    (tickers, seconds_to_next, per-second callbacks) is the real code."""

    def __init__(self) -> None:
        self._manual_now = 0.0
        super().__init__()

    def now(self) -> float:
        return self._manual_now

    def advance(self, seconds: float) -> None:
        self._manual_now += seconds
        self.advance_to(self._manual_now)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._wait_for_stop(), name="manual-refill-clock")

    async def _wait_for_stop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            await self._wake.wait()
