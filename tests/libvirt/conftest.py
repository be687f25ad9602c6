"""Fixtures for tests against a real libvirtd + QEMU (see libvirt_env.py).

- `libvirt_env` (module): a live connection (libvirtd started if needed, else the module skips
  with the reason), one throw-away dir storage pool, leftovers of killed runs removed.
- `make_domain` (function): factory for guest-less running domains with qcow2 virtio disks;
  every domain it made is destroyed, undefined (with checkpoint metadata) and its volumes
  deleted when the test ends.
- `lv_timings` (module): a dict tests put measured seconds into; printed after the module, and
  written as JSON to $VMKEEP_LIBVIRT_TIMINGS when set.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from tests.libvirt import libvirt_env as lv
from vmkeep.connectors.libvirt import LibvirtConnector


class LibvirtEnv:
    """The module's libvirt connection and storage pool; survives a libvirtd restart."""

    def __init__(self) -> None:
        self.conn = lv.ensure_libvirtd()
        lv.cleanup_leftovers(self.conn)
        self.pool = lv.TestPool(self.conn)

    def reconnect(self) -> Any:
        with contextlib.suppress(Exception):
            self.conn.close()
        self.conn = lv.wait_for_libvirtd()
        self.pool.conn = self.conn
        self.pool.pool = self.conn.storagePoolLookupByName(self.pool.name)
        return self.conn

    def alive(self) -> bool:
        try:
            self.conn.listAllDomains()
            return True
        except Exception:
            return False

    def close(self) -> None:
        if not self.alive():
            self.reconnect()
        self.pool.destroy()
        with contextlib.suppress(Exception):
            self.conn.close()


@pytest.fixture(scope="module")
def libvirt_env() -> Iterator[LibvirtEnv]:
    try:
        env = LibvirtEnv()
    except lv.LibvirtUnavailable as e:
        pytest.skip(f"libvirt not usable: {e}")
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
def make_domain(libvirt_env: LibvirtEnv) -> Iterator[Callable[..., lv.TestDomain]]:
    made: list[lv.TestDomain] = []

    def make(disk_sizes: Iterable[int] = (64 * lv.MiB,), start: bool = True) -> lv.TestDomain:
        d = lv.TestDomain(libvirt_env.conn, libvirt_env.pool, disk_sizes, start=start)
        made.append(d)
        return d

    yield make
    if not libvirt_env.alive():
        libvirt_env.reconnect()
    for d in made:
        with contextlib.suppress(Exception):
            d.reconnect(libvirt_env.conn)
        d.destroy()


@pytest.fixture(scope="module")
def lv_timings(request: pytest.FixtureRequest) -> Iterator[dict[str, float]]:
    timings: dict[str, float] = {}
    yield timings
    if not timings:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    line = "libvirt timings: " + ", ".join(f"{k}={v:.3f}" for k, v in timings.items())
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(line)
    path = os.environ.get("VMKEEP_LIBVIRT_TIMINGS")
    if path:
        with open(path, "w") as f:
            json.dump(timings, f, indent=2)


@pytest.fixture
def connector(libvirt_env: LibvirtEnv) -> Iterator[LibvirtConnector]:
    """A connector on the test daemon, closed after the test (test_connector.py and
    test_restore.py share one per module instead)."""
    c = LibvirtConnector(lv.URI)
    yield c
    c.close()
