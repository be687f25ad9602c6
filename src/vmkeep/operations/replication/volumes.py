"""Where an incremental replica's volume files are reached: on this host through their paths
(image_nbd.py, os.stat), or on the target URI's host over ssh (ssh_nbd.py: a qemu-nbd started
there, stat run there), all over one ssh connection for the run (ssh_master.py). Fresh replicas
on another host are uploaded through libvirt streams, as full replication does."""

from __future__ import annotations

from types import TracebackType

from vmkeep.connectors.libvirt.replica.record import StatVolumes, local_stat
from vmkeep.connectors.libvirt.transport.image_nbd import NbdImage, open_image
from vmkeep.connectors.libvirt.transport.ssh_master import SshMaster
from vmkeep.connectors.libvirt.transport.ssh_nbd import SshTarget


class ReplicaVolumes:
    """The replica's volume files; a context manager (it holds the ssh connection)."""

    def __init__(self, master: SshMaster | None = None) -> None:
        self._master = master
        self.remote: SshTarget | None = master.target if master else None

    @staticmethod
    def for_uri(uri: str, local: bool) -> ReplicaVolumes:
        """Local files, or an ssh connection to the host of `uri` (opened now: ConnectorError
        when ssh cannot log in)."""
        return ReplicaVolumes(None if local else SshMaster(SshTarget.from_uri(uri)))

    @property
    def upload(self) -> bool:
        """New volumes go through libvirt upload streams (their files are on another host)."""
        return self.remote is not None

    @property
    def stat(self) -> StatVolumes:
        return local_stat if self.remote is None else self.remote.stat

    def open(self, path: str, name: str) -> NbdImage:
        """A replica qcow2 volume opened read-write."""
        if self.remote is None:
            return open_image(path, "qcow2", writable=True, name=name)
        return self.remote.open_image(path, "qcow2", writable=True, name=name)

    def close(self) -> None:
        if self._master is not None:
            self._master.close()

    def __enter__(self) -> ReplicaVolumes:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
