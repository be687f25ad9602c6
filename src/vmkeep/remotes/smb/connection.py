"""One SMB connection: TCP, an authenticated session and a tree connect to the share, with a
time limit on every wait and enough credits for large reads and writes."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import uuid
from typing import Any

from smbprotocol.connection import Connection  # type: ignore[import-untyped]
from smbprotocol.exceptions import (  # type: ignore[import-untyped]
    SMBAuthenticationError,
    SMBResponseException,
)
from smbprotocol.session import Session  # type: ignore[import-untyped]
from smbprotocol.tree import TreeConnect  # type: ignore[import-untyped]

from vmkeep.errors import RemoteError

from .errors import CONNECTION_ERRORS, Failure, auth_failure, reason, setup_failure
from .target import Target

# smbprotocol logs its worker thread's failures at ERROR; we report them as RemoteError, so
# keep Python's last-resort handler from printing them when the application set up no logging.
logging.getLogger("smbprotocol").addHandler(logging.NullHandler())

_CREDIT_BYTES = 65536  # one SMB credit pays for 64 KiB of payload
_WANTED_CREDITS = 512  # enough for several 8 MiB requests in flight on one connection

# A WRITE's or READ's bytes are copied ~3 times by smbprotocol (message, transport,
# signing) while in flight: Samba's 8 MiB WRITEs held ~48 MiB for two pack uploads. 4 MiB
# halves it; a pack still takes 4 of them (Windows itself moves 1 MiB at a time).
MAX_WRITE = MAX_READ = 4 << 20


class Conn:
    """One TCP connection, authenticated session and tree connect, used by one thread at a time."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.reused = False
        self._timed_out = False
        self.connection = Connection(
            uuid.uuid4(),  # a GUID of its own, or Samba hands every connection to one process
            target.host,
            target.port,
            require_signing=target.require_signing,
        )
        # smbprotocol waits without a limit for session setup and tree connect answers:
        # a watchdog closes the socket, which wakes those waits with an error.
        watchdog = threading.Timer(target.connect_timeout, self._abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            self._setup()
        except SMBResponseException as exc:
            self.close()
            raise setup_failure(exc.status, target) from exc
        except SMBAuthenticationError as exc:
            self.close()
            raise auth_failure(target, f": {exc}") from exc
        except CONNECTION_ERRORS as exc:
            self.close()
            if "guest" in str(exc):
                raise auth_failure(target, ": the server only offers a guest session") from exc
            cause = "timed out" if self._timed_out else reason(exc)
            raise Failure(
                RemoteError(f"cannot connect to {target.where}: {cause}"), retry=True
            ) from exc
        finally:
            watchdog.cancel()

    def _setup(self) -> None:
        t = self.target
        self.connection.connect(timeout=t.connect_timeout)
        sock = self.connection.transport._sock
        # A send to a server that stopped reading must not block forever either.
        secs = int(t.request_timeout)
        usecs = int((t.request_timeout - secs) * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", secs, usecs))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # Encrypt (SMB3) when the server can, else sign; `encrypt` True/False forces it.
        encrypt = self.connection.supports_encryption if t.encrypt is None else t.encrypt
        self.session = Session(
            self.connection,
            username=t.username,
            password=t.password,
            require_encryption=bool(encrypt),
            auth_protocol="ntlm",
        )
        self.session.connect()
        self.tree = TreeConnect(self.session, rf"\\{t.host}\{t.share}")
        self.tree.connect()
        self.sid = self.session.session_id
        self.tid = self.tree.tree_connect_id
        self.max_read = min(int(self.connection.max_read_size), MAX_READ)
        self.max_write = min(int(self.connection.max_write_size), MAX_WRITE)
        if self.connection.supports_multi_credit:
            self._ask_credits()

    def _ask_credits(self) -> None:
        """Servers start a connection with few credits; ask for enough for large writes."""
        have = self.credits()
        if have < _WANTED_CREDITS:
            self.connection.echo(
                sid=self.sid,
                timeout=int(self.target.connect_timeout) or 1,
                credit_request=_WANTED_CREDITS - have,
            )

    def _abort(self) -> None:
        self._timed_out = True
        self.close()

    def alive(self) -> bool:
        transport = self.connection.transport
        return bool(
            transport is not None and transport.connected and self.connection._t_exc is None
        )

    def close(self) -> None:
        """Drop the socket without logging off: a dead server must not make this wait."""
        with contextlib.suppress(Exception):
            if self.connection.transport is not None:
                self.connection.disconnect(close=False)

    # --- requests ---------------------------------------------------------------------------

    def credits(self) -> int:
        window = self.connection.sequence_window
        return int(window["high"] - window["low"])

    def span(self, want: int, op_max: int, spare: int = 0) -> int:
        """How many bytes one READ/WRITE may move now: the size limit and the credits we hold."""
        if not self.connection.supports_multi_credit:
            return max(1, min(want, op_max, _CREDIT_BYTES))
        return max(1, min(want, op_max, max(1, self.credits() - spare) * _CREDIT_BYTES))

    def call(self, msg: Any) -> bytes:
        """Send one request, wait (bounded) for its answer, return the answer's body."""
        req = self.connection.send(msg, sid=self.sid, tid=self.tid, credit_request=self._ask(msg))
        resp = self.connection.receive(req, timeout=self.target.request_timeout)
        return bytes(resp["data"].get_value())

    def compound(
        self, msgs: list[Any], *, related: bool = True
    ) -> list[bytes | SMBResponseException]:
        """One round trip for several requests; each answer is a body or its status error.
        In a related compound every request uses the handle the first one opened."""
        reqs = self.connection.send_compound(msgs, self.sid, self.tid, related=related)
        out: list[bytes | SMBResponseException] = []
        for req in reqs:
            try:
                resp = self.connection.receive(req, timeout=self.target.request_timeout)
                out.append(bytes(resp["data"].get_value()))
            except SMBResponseException as exc:
                # Without its traceback: exc -> frame -> out -> exc is a cycle that kept every
                # caller's frame (a backup's 4 MiB chunk and its encoded copy) alive until the
                # cyclic GC ran; measured: +250 MiB RSS in an 8-thread backup.
                out.append(exc.with_traceback(None))
        return out

    def _ask(self, msg: Any) -> int | None:
        """Credits to ask for with a request: what it costs, plus a top-up to the target."""
        if not self.connection.supports_multi_credit:
            return None
        charge = int(self.connection._calculate_credit_charge(msg))
        return charge + max(0, _WANTED_CREDITS - self.credits())
