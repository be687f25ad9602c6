"""The embedded `files` connector: a VM is a directory with vm.json and raw/qcow2 disk images.

The names below are imported at first use (PEP 562), not with the package: the libvirt
connector reads and writes qcow2 images through `files.qcow2`/`qcow2_writer`, and importing
the package used to import the connector's pydantic models too (~0.13 s of every libvirt
run's start-up, docs/RUN-OVERHEAD.md)."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmkeep.connectors.files.connector import FilesConnector
    from vmkeep.connectors.files.qcow2 import Qcow2Reader
    from vmkeep.connectors.files.qcow2_writer import Qcow2DiskWriter
    from vmkeep.connectors.files.raw import RawDiskReader, RawDiskWriter

__all__ = ["FilesConnector", "Qcow2DiskWriter", "Qcow2Reader", "RawDiskReader", "RawDiskWriter"]

_HOMES = {
    "FilesConnector": "connector",
    "Qcow2Reader": "qcow2",
    "Qcow2DiskWriter": "qcow2_writer",
    "RawDiskReader": "raw",
    "RawDiskWriter": "raw",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:  # a submodule (`from vmkeep.connectors.files import raw`) or a typo
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{home}"), name)
