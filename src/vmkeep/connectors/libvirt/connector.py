"""LibvirtConnector: VMs are libvirt domains at a URI (qemu:///system by default). Running
domains are backed up live through pull-mode backup jobs over NBD with checkpoints for deltas
(on a remote URI over TCP, LIBVIRT-NOTES §16); shut-off domains by reading their images
(locally directly; over a qemu+ssh:// URI through a read-only qemu-nbd started on that host)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from vmkeep.connectors.base import DiskInfo, DiskReader, VmConfig
from vmkeep.connectors.libvirt.backup.live import LiveBackupSession, begin_live_backup
from vmkeep.connectors.libvirt.backup.offline import (
    ImageDiskReader,
    OfflineBackupSession,
    begin_offline_backup,
)
from vmkeep.connectors.libvirt.backup.remote_offline import begin_remote_offline
from vmkeep.connectors.libvirt.cleanup.remote_runs import clean_remote_runs
from vmkeep.connectors.libvirt.cleanup.stale_runs import clean_stale_runs
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.domxml import is_active, parse_disks, resolve_volume, vm_config
from vmkeep.connectors.libvirt.power import OfflinePolicy, shut_down, start_again
from vmkeep.connectors.libvirt.restore.in_place import InPlaceSink, disk_images
from vmkeep.connectors.libvirt.restore.new_domain import KEEP_MACS_KEY, NewDomainSink
from vmkeep.connectors.libvirt.transport.image_nbd import open_image
from vmkeep.connectors.libvirt.transport.nbd_reader import NbdServer
from vmkeep.connectors.libvirt.transport.ssh_master import SshMaster
from vmkeep.connectors.libvirt.transport.ssh_nbd import SshTarget, is_ssh_uri
from vmkeep.errors import ConnectorError, NotFoundError

if TYPE_CHECKING:
    from vmkeep.connectors.base import BackupSession, BackupSource, Connector, VmSink

log = logging.getLogger(__name__)

NBD_PORT = 10809  # IANA's NBD port: the first a remote job's export tries


def is_local_uri(uri: str) -> bool:
    """True for a URI of this host, where a job's unix socket and the images can be reached."""
    parts = urlsplit(uri)
    return not parts.hostname and "+" not in parts.scheme.replace("+unix", "")


@dataclass(frozen=True)
class TcpExport:
    """Where a remote live job's NBD export listens on the hypervisor (and vmkeep connects):
    --nbd-host/--nbd-port/--nbd-tls/--nbd-tls-certs, shared by backup and replication. A host
    must be given (opt-in to plain, unencrypted NBD over TCP) unless TLS is asked for, which
    defaults to the URI's host."""

    host: str | None = None
    port: int = NBD_PORT
    tls: bool = False
    tls_certificates: str = ""  # libnbd's client certificate directory ("": default)

    def server(self, uri: str) -> NbdServer:
        """The export for a running domain over `uri`; refused (one line) without the opt-in."""
        host = self.host or (urlsplit(uri).hostname if self.tls else None)
        if not host:
            raise ConnectorError(
                f"live backup over {uri} reads the disks from an NBD export on TCP: give "
                "--nbd-host ADDRESS (the hypervisor's address on a trusted management network; "
                "plain NBD is unencrypted) or --nbd-tls (needs libvirt's backup TLS set up)"
            )
        return NbdServer(
            host=host, port=self.port, tls=self.tls, tls_certificates=self.tls_certificates
        )


class LibvirtConnector:
    """Domains of one libvirt URI. `keep_checkpoints`: how many vmkeep backup checkpoints a
    successful backup leaves on the domain (the newest; at least 1, the base of the next delta).
    `max_connections`: NBD connections per disk reader (the engine reads from several threads)."""

    def __init__(
        self, uri: str = "qemu:///system", *, keep_checkpoints: int = 1, max_connections: int = 8
    ) -> None:
        self.uri = uri
        self.keep_checkpoints = max(1, keep_checkpoints)
        self.max_connections = max_connections
        self.offline: OfflinePolicy | None = None  # set: back up running domains offline
        # Remote URIs: where the live job's NBD export listens on the hypervisor (--nbd-*)
        self.nbd = TcpExport()
        self._conn = Connection(uri)

    @property
    def local(self) -> bool:
        """True for a URI of this host, where the job's unix socket can be reached."""
        return is_local_uri(self.uri)

    def list_vms(self) -> list[VmConfig]:
        """Every defined or running domain; one that vanishes or cannot be read is skipped."""
        vms = []
        for dom in self._conn.list_domains():
            try:
                vms.append(vm_config(dom))
            except ConnectorError as exc:
                log.warning("skipping domain: %s", exc)
        return sorted(vms, key=lambda vm: vm.name)

    def get_vm(self, ref: str) -> VmConfig:
        """A domain by name or uuid; NotFoundError otherwise."""
        return vm_config(self._conn.lookup(ref))

    def _domain(self, vm: VmConfig) -> Any:
        try:
            return self._conn.lookup(vm.uuid)
        except NotFoundError:
            return self._conn.lookup(vm.name)

    def begin_backup(
        self, vm: VmConfig, previous: Mapping[str, str | None]
    ) -> LiveBackupSession | OfflineBackupSession:
        """Live job for a running (or paused) domain, direct image reads for a shut-off one;
        with `offline` set, a running domain is shut down, read offline and started again.
        Leftovers of killed vmkeep runs (any domain) are cleaned up first (local URIs: their
        run directories are on this host), except the checkpoint `previous` names: a run
        killed after writing its restore point made it, and the delta builds on it. What the
        cleanup did is in the session's notes. A remote URI reads a running domain over TCP,
        a shut-off one through qemu-nbd over ssh (remote_offline.py)."""
        keep = {c for c in previous.values() if c}
        cleaned = clean_stale_runs(self._conn, keep=keep) if self.local else []
        session = self._begin(vm, previous)
        session.notes[:0] = cleaned
        return session

    def _begin(
        self, vm: VmConfig, previous: Mapping[str, str | None]
    ) -> LiveBackupSession | OfflineBackupSession:
        dom = self._domain(vm)
        after = None
        stopped: list[str] = []
        if is_active(dom):
            if self.offline is None:
                return begin_live_backup(
                    self._conn,
                    dom,
                    previous,
                    keep_checkpoints=self.keep_checkpoints,
                    max_connections=self.max_connections,
                    local=self.local,
                    tcp=None if self.local else self.tcp_export(),
                )
            if not self.local and not is_ssh_uri(self.uri):
                raise ConnectorError(
                    f"domain {vm.name} over {self.uri}: --offline reads the images through "
                    "qemu-nbd started on the host over ssh, which needs a qemu+ssh:// URI"
                )
            stopped = shut_down(dom, self.offline)  # how: for the report (forced off or not)
            for note in stopped:
                log.info("%s", note)
            after = partial(start_again, dom)
        session = self._begin_offline(dom, previous, after)
        session.notes[:0] = stopped
        return session

    def _begin_offline(
        self, dom: Any, previous: Mapping[str, str | None], after: Callable[[], str | None] | None
    ) -> OfflineBackupSession:
        """The shut-off domain's images: here, or on a remote URI's host over ssh."""
        if not self.local:
            return begin_remote_offline(
                self._conn,
                dom,
                self.uri,
                previous,
                keep_checkpoints=self.keep_checkpoints,
                after=after,
            )
        try:
            disks = [resolve_volume(dom.connect(), d) for d in parse_disks(_inactive_xml(dom))]
        except BaseException:
            if after is not None:
                after()
            raise
        return begin_offline_backup(
            dom,
            disks,
            previous,
            keep_checkpoints=self.keep_checkpoints,
            max_connections=self.max_connections,
            after=after,
        )

    def tcp_export(self) -> NbdServer:
        """Where a remote live job listens; refused unless TCP was opted in (host or TLS)."""
        return self.nbd.server(self.uri)

    # Restore settings, set by the CLI (restore --keep-macs / --force).
    keep_macs = False  # new domains keep the recorded MAC addresses instead of new ones
    power_off_running = False  # in-place restore destroys a running target domain first
    _in_place: InPlaceSink | None = None  # the in-place restore in progress, if any

    def open_disk(self, vm: VmConfig, disk: DiskInfo) -> DiskReader:
        """The disk as it is now: during an in-place restore of `vm`, read through the
        restore's own read-write connection; otherwise a shut-off domain's image read-only."""
        sink = self._in_place
        if sink is not None and sink.uuid == vm.uuid and not sink.finished:
            return sink.reader(disk.name)
        dom = self._domain(vm)
        if is_active(dom):
            raise ConnectorError(
                f"domain {vm.name} is running: its disks are read through a backup job only"
            )
        where = disk_images(self._conn.ensure(), dom).get(disk.name)
        if where is None:
            raise NotFoundError(f"domain {vm.name} has no disk {disk.name!r}")
        if not self.local:
            if not is_ssh_uri(self.uri):
                raise ConnectorError(f"the images of {vm.name} over {self.uri} cannot be read")
            ssh = SshTarget.from_uri(self.uri)
            return ssh.open_image(where.path, where.fmt, writable=False, name=disk.name)
        return open_image(where.path, where.fmt, writable=False, name=disk.name)

    def create_vm(self, config: VmConfig, target: str) -> VmSink:
        """A new domain `config.name` (defined on commit, not started) whose disks are new
        qcow2 volumes in the file-based storage pool `target` ("" = the pool "default").
        On a remote URI the volumes are written through libvirt upload streams."""
        if self.keep_macs:
            config.metadata[KEEP_MACS_KEY] = True
        if not self.local:  # volumes a killed restore over this URI left (logged)
            clean_remote_runs(self._conn)
        return NewDomainSink(self._conn, config, target, upload=not self.local)

    def overwrite_vm(self, vm: VmConfig) -> VmSink:
        """The existing domain's disks, written where they differ (restore/in_place.py); over a
        qemu+ssh:// URI through qemu-nbd started on that host over one ssh connection."""
        master = None
        if not self.local:
            if not is_ssh_uri(self.uri):
                raise ConnectorError(
                    f"in-place restore over {self.uri} writes the disks through qemu-nbd started "
                    "on the host over ssh, which needs a qemu+ssh:// URI: restore as a new domain"
                )
            master = SshMaster(SshTarget.from_uri(self.uri))
        try:
            sink = InPlaceSink(
                self._conn.ensure(),
                self._domain(vm),
                vm,
                stop_running=self.power_off_running,
                ssh=master,
            )
        except BaseException:
            if master is not None:
                master.close()
            raise
        self._in_place = sink
        return sink

    def close(self) -> None:
        self._conn.close()


def _inactive_xml(dom: Any) -> str:
    from vmkeep.connectors.libvirt.bindings import libvirt, one_line

    lv = libvirt()
    try:
        return str(dom.XMLDesc(0))
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot read domain {dom.name()}: {one_line(exc)}") from None


if TYPE_CHECKING:  # mypy proves the classes satisfy the protocols of connectors/base.py

    def _conforms(
        connector: LibvirtConnector,
        live: LiveBackupSession,
        offline: OfflineBackupSession,
        readers: tuple[ImageDiskReader],
    ) -> tuple[BackupSource, Connector, BackupSession, BackupSession, DiskReader]:
        return connector, connector, live, offline, readers[0]
