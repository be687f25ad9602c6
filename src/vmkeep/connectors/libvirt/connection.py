"""One libvirt connection that can be re-opened: a libvirtd restart kills every open
virConnect while QEMU, the backup job and its NBD export survive (LIBVIRT-NOTES §8), so the
session reconnects instead of failing, and every libvirt error becomes a one-line message."""

from __future__ import annotations

import contextlib
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlsplit

from vmkeep.connectors.libvirt.bindings import error_code, libvirt, one_line
from vmkeep.errors import ConnectorError, NotFoundError


class Connection:
    """A lazily opened libvirt connection to `uri`."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None
        self._host_id = ""  # host_id(), once known

    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> Any:
        lv = libvirt()
        try:
            return lv.open(self.uri)
        except lv.libvirtError as exc:
            raise ConnectorError(
                f"cannot connect to libvirt at {self.uri}: {one_line(exc)}"
            ) from None

    def alive(self) -> bool:
        if self._conn is None:
            return False
        try:
            # isAlive() stays true until a call fails on the dead socket: ask the daemon.
            return bool(self._conn.isAlive()) and bool(self._conn.getLibVersion())
        except Exception:
            return False

    def reconnect(self, timeout: float = 30.0) -> Any:
        """Drop the connection and open a new one, retrying while libvirtd restarts."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            try:
                return self.conn
            except ConnectorError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def ensure(self) -> Any:
        """The connection, re-opened when libvirtd went away since it was opened."""
        if self._conn is not None and not self.alive():
            return self.reconnect()
        return self.conn

    def list_domains(self) -> list[Any]:
        try:
            return list(self.ensure().listAllDomains(0))
        except libvirt().libvirtError as exc:
            raise ConnectorError(f"cannot list domains on {self.uri}: {one_line(exc)}") from None

    def lookup(self, ref: str) -> Any:
        """A domain by uuid or name; NotFoundError when there is none."""
        lv = libvirt()
        conn = self.ensure()
        if not ref:
            raise NotFoundError("no domain given")
        lookups = [conn.lookupByName]
        if _is_uuid(ref):
            lookups.insert(0, conn.lookupByUUIDString)
        for lookup in lookups:
            try:
                return lookup(ref)
            except lv.libvirtError as exc:
                if error_code(exc) != lv.VIR_ERR_NO_DOMAIN:
                    raise ConnectorError(
                        f"cannot look up domain {ref!r}: {one_line(exc)}"
                    ) from None
        raise NotFoundError(f"no libvirt domain {ref!r} on {self.uri} (by name or uuid)")

    def host_id(self) -> str:
        """This hypervisor whatever the URI's spelling (`root@kvm2` or `kvm2`, with or without
        options): the driver, the URI's path and the host UUID from libvirt's capabilities,
        e.g. "qemu:///system 2b02...". "" when libvirt tells no UUID. Asked once per
        connection object (a run asks for it for its record and for the clean-up)."""
        if self._host_id:
            return self._host_id
        lv = libvirt()
        try:
            caps = ET.fromstring(self.ensure().getCapabilities())
        except (lv.libvirtError, ET.ParseError):
            return ""
        host_uuid = (caps.findtext("host/uuid") or "").strip()
        if not host_uuid:
            return ""
        parts = urlsplit(self.uri)
        self._host_id = f"{parts.scheme.split('+')[0]}://{parts.path or '/'} {host_uuid}"
        return self._host_id

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def _is_uuid(ref: str) -> bool:
    try:
        uuidlib.UUID(ref)
    except ValueError:
        return False
    return True
