"""Shutting a running domain down for an `--offline` backup and starting it again.

A clean shutdown is asked of the guest (ACPI power button, `virDomainShutdown`) and awaited up
to a timeout. A guest that does not answer (no OS, a hung OS, ACPI ignored) is then either left
running with a clear error, or, with `force_off`, powered off: QEMU gets SIGTERM first
(VIR_DOMAIN_DESTROY_GRACEFUL), which still closes the images cleanly and stores the dirty
bitmaps; only if QEMU ignores that is it killed, and then the next backup falls back to a full
read because the bitmaps were not stored."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.errors import ConnectorError

POLL = 0.1


@dataclass(frozen=True)
class OfflinePolicy:
    """How `--offline` stops a running domain."""

    shutdown_timeout: float = 300.0  # seconds to wait for the guest after the ACPI request
    force_off: bool = False  # then power it off instead of failing


def _wait_off(dom: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not _active(dom):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def _active(dom: Any) -> bool:
    lv = libvirt()
    try:
        return bool(dom.isActive())
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot query domain {dom.name()}: {one_line(exc)}") from None


def shut_down(dom: Any, policy: OfflinePolicy) -> list[str]:
    """Stop the running `dom`; notes on how. Raises ConnectorError when it is still running."""
    lv = libvirt()
    name = dom.name()
    try:
        dom.shutdown()
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot shut down domain {name}: {one_line(exc)}") from None
    t0 = time.monotonic()
    if _wait_off(dom, policy.shutdown_timeout):
        return [f"domain {name} shut down cleanly for an offline backup"]
    waited = time.monotonic() - t0
    if not policy.force_off:
        raise ConnectorError(
            f"domain {name} did not shut down within {waited:.0f} s of the ACPI shutdown "
            "request (is a guest OS answering?); nothing was backed up and it was left running "
            "(a guest still shutting down will stay off): use --force-off, or a longer "
            "--shutdown-timeout"
        )
    return [
        f"domain {name} ignored the ACPI shutdown request for {waited:.0f} s: " + _power_off(dom)
    ]


def _power_off(dom: Any) -> str:
    lv = libvirt()
    try:
        dom.destroyFlags(lv.VIR_DOMAIN_DESTROY_GRACEFUL)
        if _wait_off(dom, 30):
            return "powered off (QEMU stopped with SIGTERM, images closed cleanly)"
    except lv.libvirtError:
        pass  # QEMU did not stop on SIGTERM in libvirt's own wait: kill it
    try:
        dom.destroy()
    except lv.libvirtError as exc:
        if _active(dom):
            raise ConnectorError(f"cannot power off domain {dom.name()}: {one_line(exc)}") from None
    return "powered off (QEMU killed: its dirty bitmaps are lost, the next backup is full)"


def start_again(dom: Any) -> str | None:
    """Start the domain the offline backup stopped; a note when that fails."""
    lv = libvirt()
    try:
        if not dom.isActive():
            dom.create()
    except lv.libvirtError as exc:
        return f"domain {dom.name()} could not be started again: {one_line(exc)}"
    return None
