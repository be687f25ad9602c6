"""Where an incremental replica's volume files are reached: on this host through their paths
(image_nbd.py, os.stat), or on the target URI's host over ssh (ssh_nbd.py: a qemu-nbd started
there, stat run there). Fresh replicas on another host are uploaded through libvirt streams,
as full replication does."""

from __future__ import annotations

from dataclasses import dataclass

from vmkeep.connectors.libvirt.image_nbd import NbdImage, open_image
from vmkeep.connectors.libvirt.replica_record import StatVolumes, local_stat
from vmkeep.connectors.libvirt.ssh_nbd import SshTarget


@dataclass(frozen=True)
class ReplicaVolumes:
    remote: SshTarget | None = None  # None: the volumes are files of this host

    @staticmethod
    def for_uri(uri: str, local: bool) -> ReplicaVolumes:
        return ReplicaVolumes(None if local else SshTarget.from_uri(uri))

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
