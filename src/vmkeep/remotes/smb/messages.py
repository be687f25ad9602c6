"""The SMB2 requests the remote sends, built from smbprotocol's structures, and the parsing of
the answers it reads fields from."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from smbprotocol.file_info import (  # type: ignore[import-untyped]
    FileFsFullSizeInformation,
    FileInformationClass,
)
from smbprotocol.open import (  # type: ignore[import-untyped]
    CreateOptions,
    FileAttributes,
    ImpersonationLevel,
    RequestedOplockLevel,
    ShareAccess,
    SMB2CloseRequest,
    SMB2CreateRequest,
    SMB2FlushRequest,
    SMB2QueryDirectoryRequest,
    SMB2QueryInfoRequest,
    SMB2ReadRequest,
    SMB2SetInfoRequest,
    SMB2WriteRequest,
)

RELATED_FID = b"\xff" * 16  # "the handle the previous request of this compound opened"
SHARE_ALL = (
    ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_WRITE | ShareAccess.FILE_SHARE_DELETE
)

_FILETIME_UNIX_EPOCH = 116444736000000000  # 1970-01-01 in 100 ns ticks since 1601
_DIR_ENTRY = struct.Struct("<IIqqqqqqII")  # FileDirectoryInformation without its name
_CREATE_RESPONSE = struct.Struct("<HBBIqqqqqqII16s")
_FILE_ATTRIBUTE_DIRECTORY = 0x10
_HEADER_BYTES = 64  # answers count their buffer offsets from the start of the SMB2 header

# (name, size, mtime, is_dir) of a directory entry
DirEntry = tuple[str, int, float, bool]


def create(
    path: str,
    access: int,
    disposition: int,
    options: int = 0,
    *,
    share: int = ShareAccess.FILE_SHARE_READ | ShareAccess.FILE_SHARE_DELETE,
    directory: bool = False,
) -> Any:
    req = SMB2CreateRequest()
    req["requested_oplock_level"] = RequestedOplockLevel.SMB2_OPLOCK_LEVEL_NONE
    req["impersonation_level"] = ImpersonationLevel.Impersonation
    req["desired_access"] = access
    req["file_attributes"] = (
        FileAttributes.FILE_ATTRIBUTE_DIRECTORY
        if directory
        else FileAttributes.FILE_ATTRIBUTE_NORMAL
    )
    req["share_access"] = share
    req["create_disposition"] = disposition
    req["create_options"] = options | (
        CreateOptions.FILE_DIRECTORY_FILE if directory else CreateOptions.FILE_NON_DIRECTORY_FILE
    )
    req["buffer_path"] = path.encode("utf-16-le") if path else b"\x00\x00"
    return req


def open_dir(path: str, access: int, disposition: int) -> Any:
    """CREATE of a directory that other clients may go on using meanwhile."""
    return create(path, access, disposition, share=SHARE_ALL, directory=True)


@dataclass(frozen=True)
class Opened:
    file_id: bytes
    size: int
    mtime: float
    is_dir: bool


def _filetime(value: int) -> float:
    return (value - _FILETIME_UNIX_EPOCH) / 1e7


def parse_create(body: bytes) -> Opened:
    f = _CREATE_RESPONSE.unpack_from(body)
    # fields: size, oplock, flags, action, ctime, atime, mtime, change, alloc, eof, attrs, _, fid
    return Opened(
        file_id=f[12],
        size=f[9],
        mtime=_filetime(f[6]),
        is_dir=bool(f[10] & _FILE_ATTRIBUTE_DIRECTORY),
    )


def close(file_id: bytes) -> Any:
    req = SMB2CloseRequest()
    req["file_id"] = file_id
    return req


def flush(file_id: bytes) -> Any:
    req = SMB2FlushRequest()
    req["file_id"] = file_id
    return req


def write(file_id: bytes, offset: int, data: bytes) -> Any:
    req = SMB2WriteRequest()
    req["length"] = len(data)
    req["offset"] = offset
    req["file_id"] = file_id
    req["buffer"] = data
    return req


def written(body: bytes) -> int:
    """How many bytes a WRITE answer says were written."""
    return int(struct.unpack_from("<I", body, 4)[0])


def read(file_id: bytes, offset: int, length: int) -> Any:
    req = SMB2ReadRequest()
    req["length"] = length
    req["offset"] = offset
    req["minimum_count"] = 0
    req["file_id"] = file_id
    req["padding"] = b"\x50"
    return req


def read_data(body: bytes) -> bytes:
    data_offset, data_length = body[2], struct.unpack_from("<I", body, 4)[0]
    start = data_offset - _HEADER_BYTES
    return body[start : start + data_length]


def set_info(file_id: bytes, info: Any) -> Any:
    req = SMB2SetInfoRequest()
    req["info_type"] = info.INFO_TYPE
    req["file_info_class"] = info.INFO_CLASS
    req["file_id"] = file_id
    req["buffer"] = info
    return req


def _output_buffer(body: bytes) -> memoryview:
    """The buffer of a QUERY_DIRECTORY or QUERY_INFO answer."""
    offset, length = struct.unpack_from("<HI", body, 2)
    start = offset - _HEADER_BYTES
    return memoryview(body)[start : start + length]


def query_fs_full_size(file_id: bytes) -> Any:
    req = SMB2QueryInfoRequest()
    req["info_type"] = FileFsFullSizeInformation.INFO_TYPE
    req["file_info_class"] = FileFsFullSizeInformation.INFO_CLASS
    req["file_id"] = file_id
    req["output_buffer_length"] = 32
    return req


def parse_fs_full_size(body: bytes) -> int | None:
    """Bytes the caller may still write, from a FileFsFullSizeInformation answer."""
    buf = _output_buffer(body)
    if len(buf) < 32:
        return None
    _total, caller_avail, _actual, sectors, sector_bytes = struct.unpack_from("<qqqII", buf)
    return int(caller_avail * sectors * sector_bytes)


def query_directory(file_id: bytes, pattern: str, page_bytes: int) -> Any:
    req = SMB2QueryDirectoryRequest()
    req["file_information_class"] = FileInformationClass.FILE_DIRECTORY_INFORMATION
    req["flags"] = 0
    req["file_index"] = 0
    req["file_id"] = file_id
    req["output_buffer_length"] = page_bytes
    req["buffer"] = pattern.encode("utf-16-le")
    return req


def parse_directory(body: bytes) -> Iterator[DirEntry]:
    """(name, size, mtime, is_dir) of each FileDirectoryInformation entry of one page."""
    buf = _output_buffer(body)
    pos = 0
    while True:
        nxt, _idx, _c, _a, mtime, _ch, eof, _al, attrs, name_len = _DIR_ENTRY.unpack_from(buf, pos)
        start = pos + _DIR_ENTRY.size
        name = bytes(buf[start : start + name_len]).decode("utf-16-le")
        if name not in (".", ".."):
            yield name, eof, _filetime(mtime), bool(attrs & _FILE_ATTRIBUTE_DIRECTORY)
        if not nxt:
            return
        pos += nxt
