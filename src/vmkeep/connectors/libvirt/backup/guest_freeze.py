"""Freezing a guest's file systems through its QEMU guest agent around the start of a backup job,
with bounded waits (LIBVIRT-NOTES §17).

libvirt waits for the agent's answer without limit by default: measured here, `fsFreeze` on a
guest whose qemu-ga was stopped had not returned after 290 s, and a freeze hook sleeping 20 s
held it 20 s. So every agent call runs in a worker thread and the backup goes on without it
after FREEZE_TIMEOUT (crash-consistent, said in a note). The agent may still complete such a
freeze later (after its hook, say): the worker then thaws the guest at once, and the session's
end waits a bounded time for that, so a guest is not left frozen by vmkeep while it runs.
And for when vmkeep does not run to that end (killed, or leaving with a freeze still pending),
a separate process thaws the guest (thaw_guard.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from vmkeep.connectors.libvirt.backup.thaw_guard import ThawGuard
from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.connectors.libvirt.domxml import has_guest_agent

log = logging.getLogger(__name__)

FREEZE_TIMEOUT = 20.0  # seconds the agent gets to freeze (its freeze hooks included) or thaw
# libvirt's own limit on an agent answer, in FREEZE_TIMEOUTs: longer than vmkeep's wait, so a
# freeze that lands late still answers (and is thawed at once), yet bounded, so a stopped agent
# cannot hold the domain's agent job (and the backup behind it) for ever.
AGENT_TIMEOUT_FACTOR = 3


class _Call:
    """One libvirt call in a daemon thread; `then` runs in that thread with its outcome."""

    def __init__(self, call: Callable[[], Any], then: Callable[[str | None], None]) -> None:
        self.done = threading.Event()
        self.error: str | None = None
        self._call, self._then = call, then
        threading.Thread(target=self._run, name="vmkeep-guest-agent", daemon=True).start()

    def _run(self) -> None:
        try:
            self._call()
        except libvirt().libvirtError as exc:
            self.error = one_line(exc)
        except Exception as exc:
            self.error = str(exc) or type(exc).__name__
        self._then(self.error)
        self.done.set()


class GuestFreeze:
    """The freeze around one job start: `freeze`, then `thaw` when it answered True, and
    `settle` when the session ends. Notes go to `notes` (the run's report)."""

    def __init__(self, dom: Any, notes: list[str], timeout: float | None = None) -> None:
        self._dom = dom
        self._notes = notes
        self.timeout = FREEZE_TIMEOUT if timeout is None else timeout
        self._lock = threading.Lock()
        self._gave_up = False
        self._answered = False  # the freeze call returned (set under the lock)
        self._pending: _Call | None = None  # a freeze request vmkeep stopped waiting for
        self._bounded = False  # this run set the domain's agent response timeout
        self._guard: ThawGuard | None = None  # thaws the guest if vmkeep dies meanwhile
        self._thawed = True  # False while the guest may be frozen by this run

    def freeze(self, xml: str) -> bool:
        """True when the guest's file systems are frozen now; else a note says why not."""
        if not has_guest_agent(xml):
            self._notes.append("no guest agent connected: crash-consistent backup (no fs freeze)")
            return False
        self._bound_agent_waits()
        self._start_guard()
        self._thawed = False
        call = _Call(lambda: self._dom.fsFreeze(None, 0), self._frozen_late)
        if call.done.wait(self.timeout):
            if call.error is None:
                return True
            self._notes.append(
                f"guest agent did not freeze the file systems ({call.error}): crash-consistent "
                "backup"
            )
            self._thawed = True
            self._release_guard()
            return False
        with self._lock:
            if not self._answered:
                self._gave_up = True
                self._pending = call
                self._notes.append(
                    f"guest agent did not freeze the file systems within {self.timeout:.0f} s: "
                    "crash-consistent backup (a freeze it completes later is thawed at once)"
                )
                return False
        return call.error is None  # answered in the instant between the wait and the lock

    def _frozen_late(self, error: str | None) -> None:
        """In the freeze's thread: a freeze that succeeds after vmkeep gave up is thawed."""
        with self._lock:
            self._answered = True
            late = self._gave_up and error is None
        if late:
            log.warning("the guest agent froze the file systems late: thawing them")
            note = self.thaw()
            if note:
                log.warning("%s", note)

    def thaw(self) -> str | None:
        """Thaw (bounded); a note when the file systems may still be frozen."""
        call = _Call(lambda: self._dom.fsThaw(None, 0), lambda _e: None)
        if not call.done.wait(self.timeout):
            return (
                f"guest agent did not thaw the file systems within {self.timeout:.0f} s: they may "
                f"still be frozen (check with 'virsh domfsthaw {self._dom.name()}')"
            )
        if call.error is not None:
            return f"guest file systems could not be thawed: {call.error}"
        with self._lock:
            self._thawed = True
            done = self._pending is None
        if done:
            self._release_guard()
        return None

    def _start_guard(self) -> None:
        window = (AGENT_TIMEOUT_FACTOR + 1) * self.timeout  # how late a freeze can still land
        try:
            uri = self._dom.connect().getURI()
            self._guard = ThawGuard(uri, self._dom.UUIDString(), window)
        except (OSError, libvirt().libvirtError) as exc:
            log.warning(
                "cannot start the thaw guard (%s): a vmkeep killed while the guest is "
                "frozen would leave it frozen",
                exc,
            )

    def _release_guard(self) -> None:
        if self._guard is not None:
            self._guard.release()

    def _bound_agent_waits(self) -> None:
        """Make libvirt itself give up on the agent after a while: a worker thread alone
        is not enough, because a call libvirt still waits for holds the domain's agent job,
        and with a stopped qemu-ga that blocked the backup's next libvirt calls (jobStats)
        for more than 60 s. The domain's own setting is runtime only; `settle` puts libvirt's
        default back (a custom value set with `virsh guest-agent-timeout` is not restored)."""
        try:
            self._dom.agentSetResponseTimeout(max(1, round(AGENT_TIMEOUT_FACTOR * self.timeout)), 0)
            self._bounded = True
        except (libvirt().libvirtError, AttributeError) as exc:
            log.info("cannot bound the guest agent's response time: %s", exc)

    def settle(self) -> str | None:
        """At the session's end: give a freeze request still pending up to the timeout to
        complete (and be thawed) before vmkeep may exit, then restore libvirt's default agent
        timeout; a note when the request is still pending."""
        pending = self._pending
        settled = pending is None or pending.done.wait(self.timeout)
        if self._guard is not None:
            if settled and self._thawed:
                self._guard.release()
            else:
                self._guard.abandon()  # it thaws the guest if the freeze lands after all
        if self._bounded:
            try:
                lv = libvirt()
                self._dom.agentSetResponseTimeout(lv.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT, 0)
            except Exception as exc:  # the domain may be gone: nothing to restore then
                log.info("cannot restore the guest agent's default timeout: %s", exc)
        if settled:
            return None
        return (
            f"guest agent has not answered the freeze request after {2 * self.timeout:.0f} s; "
            "if it completes it after vmkeep exits, a guard process thaws the guest's file "
            f"systems (check with 'virsh domfsthaw {self._dom.name()}')"
        )
