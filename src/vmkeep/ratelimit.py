"""A thread-safe token bucket that paces the bytes a backup reads from a VM (`max_rate`).

Workers reserve their bytes *before* they read, so a waiting worker holds no data (memory
stays bounded by the data path's own window) and the source disk is never read faster than
the rate. The bucket may go into debt: each caller takes its tokens at once and sleeps only
for its own share of the deficit, outside the lock, so N workers wait in parallel and the
pipeline as a whole runs at the rate (never slower because one worker sleeps). The idea is
the classic token bucket (as in Linux's tc-tbf); the code is our own.
"""

from __future__ import annotations

import threading
import time

from vmkeep.errors import TaskCancelled

# Tokens saved while idle (between disks, during a slow upload) are capped to this many
# seconds of the rate, so a pause is not followed by a long burst above the limit.
BURST_SECONDS = 0.25


class RateLimiter:
    """At most `rate` bytes per second on average over everything passed to `acquire`."""

    def __init__(self, rate: int, burst_seconds: float = BURST_SECONDS) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = rate * burst_seconds
        self._tokens = 0.0  # an empty bucket: even a short backup starts paced
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def reserve(self, amount: int) -> float:
        """Take `amount` tokens now; the seconds the caller must wait before using them."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= amount
            return max(0.0, -self._tokens / self.rate)

    def refund(self, amount: int) -> None:
        """Give back tokens a stopped worker reserved but never used."""
        with self._lock:
            self._tokens = min(self.capacity, self._tokens + amount)

    def throttle(self) -> Throttle:
        """One transfer's use of this limiter (several transfers may share it)."""
        return Throttle(self)


class Throttle:
    """One backup's workers on a (possibly shared) limiter. `stop` wakes only this backup's
    sleepers, so an aborted VM stops at once while the other VMs of a run keep their pace."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self._stopped = threading.Event()

    def acquire(self, amount: int) -> None:
        """Block until `amount` bytes may be read; raises TaskCancelled once stopped."""
        if self._stopped.is_set():
            raise TaskCancelled("the transfer was stopped")
        delay = self.limiter.reserve(amount)
        if delay > 0 and self._stopped.wait(delay):
            self.limiter.refund(amount)  # nothing was read: the others may use the share
            raise TaskCancelled("the transfer was stopped")

    def stop(self) -> None:
        """Wake this transfer's waiting workers (they raise): the backup is unwinding."""
        self._stopped.set()
