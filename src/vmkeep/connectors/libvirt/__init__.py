"""The `libvirt` connector: KVM/QEMU domains through libvirt, live backups over NBD with
checkpoints and dirty bitmaps, shut-off domains read from their images."""

from vmkeep.connectors.libvirt.connector import LibvirtConnector
from vmkeep.connectors.libvirt.live import LiveBackupSession
from vmkeep.connectors.libvirt.nbd_reader import NbdDiskReader
from vmkeep.connectors.libvirt.offline import ImageDiskReader, OfflineBackupSession

__all__ = [
    "ImageDiskReader",
    "LibvirtConnector",
    "LiveBackupSession",
    "NbdDiskReader",
    "OfflineBackupSession",
]
