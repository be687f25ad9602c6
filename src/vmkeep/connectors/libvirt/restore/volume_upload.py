"""Writing a restored disk into a volume of a libvirt host whose files vmkeep cannot reach (a
qemu+ssh:// or qemu+tcp:// URI): the disk is first restored into a local temporary qcow2 image,
then its file bytes are sent with virStorageVolUpload into a qcow2 volume created for it.

Why a qcow2 image and not raw data: an upload stream carries the volume file's bytes verbatim,
so a raw upload would send the whole virtual size, holes included; the qcow2 file holds only the
allocated clusters plus small tables, so the stream carries about what the restore wrote.

The volume is created empty (raw, capacity 0) and the upload writes the whole file: an upload
does not truncate, so over a pre-made qcow2 volume a shorter image would leave the old file's
tail behind. When the upload ends libvirt refreshes the volume, probes it and reports it as
qcow2 of the restored capacity (checked on libvirt 9.0, LIBVIRT-NOTES); the domain XML names the
format explicitly, so nothing at run time depends on that probe."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, BinaryIO

from vmkeep.connectors.files.qcow2_writer import Qcow2DiskWriter
from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.errors import ConnectorError
from vmkeep.private_tmp import private_dir

SEND_BLOCK = 1 << 20  # bytes per stream message; libvirt caps a message at 256 KiB-16 MiB


def upload_file(conn: Any, vol: Any, path: str, label: str) -> int:
    """Send the file at `path` as the whole content of `vol`. Returns the bytes sent."""
    lv = libvirt()
    size = os.path.getsize(path)
    stream = conn.newStream(0)
    try:
        vol.upload(stream, 0, size, 0)
        with open(path, "rb") as f:
            stream.sendAll(_read_block, f)
        stream.finish()
    except lv.libvirtError as exc:
        with contextlib.suppress(Exception):
            stream.abort()
        raise ConnectorError(f"cannot upload {label}: {one_line(exc)}") from None
    except OSError as exc:
        with contextlib.suppress(Exception):
            stream.abort()
        raise ConnectorError(f"cannot upload {label}: {exc.strerror}") from None
    return size


def _read_block(_stream: Any, nbytes: int, f: BinaryIO) -> bytes:
    return f.read(min(nbytes, SEND_BLOCK))


class UploadingVolumeWriter:
    """A DiskWriter into a local temporary qcow2 image, uploaded into `vol` by close().
    The temporary file is removed whatever happens; close is idempotent."""

    def __init__(self, conn: Any, vol: Any, size: int, label: str) -> None:
        self._conn = conn
        self._vol = vol
        self._label = label
        # In the process's private directory: removed at exit, and by the next vmkeep
        # process if this one is killed (the image can be as large as the disk).
        fd, self._path = tempfile.mkstemp(prefix="upload-", suffix=".qcow2", dir=private_dir())
        os.close(fd)
        try:
            self._writer: Qcow2DiskWriter | None = Qcow2DiskWriter(
                self._path, size, replace_existing=True
            )
        except BaseException:
            os.unlink(self._path)
            raise
        self.bytes_uploaded = 0

    def _inner(self) -> Qcow2DiskWriter:
        if self._writer is None:
            raise ConnectorError(f"{self._label} is already closed")
        return self._writer

    def write(self, offset: int, data: bytes) -> None:
        self._inner().write(offset, data)

    def write_parts(self, offset: int, parts: list[bytes]) -> None:
        self._inner().write_parts(offset, parts)

    def zero(self, offset: int, length: int) -> None:
        self._inner().zero(offset, length)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
            self.bytes_uploaded = upload_file(self._conn, self._vol, self._path, self._label)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self._path)

    def discard(self) -> None:
        """Drop the local image without uploading (restore aborted)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
            with contextlib.suppress(OSError):
                os.unlink(self._path)
