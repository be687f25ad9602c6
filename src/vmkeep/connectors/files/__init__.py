"""The embedded `files` connector: a VM is a directory with vm.json and raw/qcow2 disk images."""

from vmkeep.connectors.files.connector import FilesConnector
from vmkeep.connectors.files.qcow2 import Qcow2Reader
from vmkeep.connectors.files.qcow2_writer import Qcow2DiskWriter
from vmkeep.connectors.files.raw import RawDiskReader, RawDiskWriter

__all__ = ["FilesConnector", "Qcow2DiskWriter", "Qcow2Reader", "RawDiskReader", "RawDiskWriter"]
