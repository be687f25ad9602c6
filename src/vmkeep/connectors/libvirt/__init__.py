"""The `libvirt` connector: KVM/QEMU domains through libvirt, live backups over NBD with
checkpoints and dirty bitmaps, shut-off domains read from their images."""

from vmkeep.connectors.libvirt.backup.live import LiveBackupSession
from vmkeep.connectors.libvirt.backup.offline import ImageDiskReader, OfflineBackupSession
from vmkeep.connectors.libvirt.connector import LibvirtConnector
from vmkeep.connectors.libvirt.transport.nbd_reader import NbdDiskReader

__all__ = [
    "ImageDiskReader",
    "LibvirtConnector",
    "LiveBackupSession",
    "NbdDiskReader",
    "OfflineBackupSession",
]
