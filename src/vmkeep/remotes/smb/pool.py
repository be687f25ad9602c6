"""The connections of one remote: a pool of idle ones that threads borrow for a whole
operation, and the retry loop that runs an operation until it succeeds or time runs out."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from smbprotocol.exceptions import SMBResponseException  # type: ignore[import-untyped]

from vmkeep.errors import RemoteError, VmkeepError

from .connection import Conn
from .errors import CONNECTION_ERRORS, RECONNECT, TRANSIENT, Failure, reason, status_name
from .target import Target

_T = TypeVar("_T")
_MAX_IDLE = 16
_FIRST_DELAY = 0.25  # seconds before the first retry; doubled after each one...
_MAX_DELAY = 8.0  # ...up to this


class Pool:
    """Idle connections; a thread borrows one for a whole operation, so none is shared.

    `run` retries transient failures (lost connection, timeouts, server busy) with exponential
    backoff for at most `retry_time` seconds, then raises RemoteError."""

    def __init__(self, target: Target, retry_time: float) -> None:
        self.target = target
        self.retry_time = retry_time
        self._lock = threading.Lock()
        self._idle: list[Conn] = []
        self._closed = False

    def acquire(self) -> Conn:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.alive():
                    conn.reused = True
                    return conn
                conn.close()
        return Conn(self.target)  # outside the lock: connecting takes a round trip or four

    def release(self, conn: Conn, healthy: bool) -> None:
        if healthy and conn.alive():
            with self._lock:
                if not self._closed and len(self._idle) < _MAX_IDLE:
                    self._idle.append(conn)
                    return
        conn.close()

    def drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.drop_idle()

    def run(self, fn: Callable[[Conn], _T]) -> _T:
        """Run `fn` on a borrowed connection, retrying transient failures with backoff."""
        start = time.monotonic()
        delay = _FIRST_DELAY
        while True:
            try:
                return self._once(fn)
            except Failure as exc:
                failure = exc
            if not failure.retry:
                raise failure.error
            if failure.quick:  # a pooled connection had gone stale: reconnect at once
                continue
            if time.monotonic() - start + delay > self.retry_time:
                raise RemoteError(
                    f"{failure.error.message} (gave up after {time.monotonic() - start:.0f} s)"
                )
            time.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY)

    def _once(self, fn: Callable[[Conn], _T]) -> _T:
        """One attempt: raises Failure for what another attempt might cure (or explain)."""
        conn = self.acquire()
        healthy = False
        try:
            result = fn(conn)
            healthy = True
            return result
        except (VmkeepError, Failure):
            healthy = True
            raise
        except SMBResponseException as exc:
            healthy = exc.status not in RECONNECT
            raise Failure(
                RemoteError(f"{self.target.where} failed: {status_name(exc.status)}"),
                retry=exc.status in TRANSIENT,
                quick=not healthy and conn.reused,
            ) from exc
        except CONNECTION_ERRORS as exc:
            if conn.reused:
                self.drop_idle()  # the server restarted? the others are stale too
            raise Failure(
                RemoteError(f"lost the connection to {self.target.where}: {reason(exc)}"),
                retry=True,
                quick=conn.reused,
            ) from exc
        except Exception as exc:
            raise RemoteError(f"SMB client error on {self.target.where}: {exc}") from exc
        finally:
            self.release(conn, healthy=healthy)
