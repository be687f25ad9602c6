"""The token bucket behind `max_rate`: parallel workers of several transfers
sharing it together keep to the rate, and a stopped transfer wakes its sleepers at once (an
aborted backup must not sleep out its share)."""

from __future__ import annotations

import threading
import time

import pytest

from vmkeep.errors import TaskCancelled
from vmkeep.ratelimit import RateLimiter


def test_parallel_workers_together_keep_to_the_rate() -> None:
    # Timing is the feature here: 4 workers x 5 x 100 kB at 1 MB/s must take about 2 s.
    limiter = RateLimiter(1_000_000)

    def worker() -> None:
        throttle = limiter.throttle()  # one transfer each, like the VMs of a job's run
        for _ in range(5):
            throttle.acquire(100_000)

    began = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    assert 1.9 <= elapsed <= 3.0, elapsed


def test_workers_wait_in_parallel_not_one_after_another() -> None:
    """Each reservation's delay is its place in the queue: the fourth of four 250 kB
    reservations at 1 MB/s waits ~1 s, not 4 x 1 s (no serialization beyond the rate)."""
    limiter = RateLimiter(1_000_000)
    delays = [limiter.reserve(250_000) for _ in range(4)]
    assert delays == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=0.05)


def test_idle_time_saves_at_most_a_short_burst() -> None:
    limiter = RateLimiter(1_000_000, burst_seconds=0.1)
    time.sleep(0.3)
    assert limiter.reserve(100_000) == pytest.approx(0.0, abs=0.01)  # the saved burst
    assert limiter.reserve(100_000) == pytest.approx(0.1, abs=0.02)  # no more than that


def test_stop_wakes_only_that_transfers_sleeper_and_refunds_its_share() -> None:
    limiter = RateLimiter(10_000)  # 20 kB would take 2 s
    mine, other = limiter.throttle(), limiter.throttle()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            mine.acquire(20_000)
        except TaskCancelled as exc:
            errors.append(exc)

    t = threading.Thread(target=worker)
    began = time.monotonic()
    t.start()
    time.sleep(0.1)
    mine.stop()
    t.join(2)
    assert not t.is_alive() and time.monotonic() - began < 1.0
    assert len(errors) == 1
    with pytest.raises(TaskCancelled):
        mine.acquire(1)
    # The stopped transfer read nothing: its tokens went back, the other one barely waits.
    began = time.monotonic()
    other.acquire(1_000)
    assert time.monotonic() - began < 0.5


@pytest.mark.parametrize("rate", [0, -5])
def test_a_rate_must_be_positive(rate: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate)
