"""A read-only, seekable stream over an object's pieces, so an SDK can send an object made
of many buffers (a data pack: its header, then each blob's sealed pieces) without them being
joined into one: a join holds the object twice while it copies, and a 16 MiB block of the
allocator's heap per pack in flight fragments it (measured: a format 3 backup to S3 peaked
20-40 MiB higher with joined packs). S3 sends it as the body of its PUT; SMB takes each
WRITE's bytes from it."""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer

Part = bytes | bytearray | memoryview


class PartsReader(io.RawIOBase):
    """The concatenation of `parts`, read from where the position is; `seek` goes anywhere
    (an SDK rewinds the body to retry, or reads it once to checksum it first)."""

    def __init__(self, parts: Sequence[Part]) -> None:
        self._parts = [memoryview(p).cast("B") for p in parts]
        self._starts: list[int] = []
        total = 0
        for part in self._parts:
            self._starts.append(total)
            total += len(part)
        self._size = total
        self._pos = 0

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Buffer) -> int:
        out = memoryview(buffer).cast("B")
        done = 0
        for piece in self._views(self._pos, len(out)):
            out[done : done + len(piece)] = piece
            done += len(piece)
        self._pos += done
        return done

    def read_at(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer at the end), copied once; the position stays."""
        return b"".join(self._views(offset, length))

    def _views(self, offset: int, length: int) -> Iterator[memoryview]:
        """The pieces of the parts that hold `length` bytes from `offset`, in order."""
        k = max(0, bisect.bisect_right(self._starts, offset) - 1)
        end = min(self._size, offset + length)
        while offset < end:
            part = self._parts[k]
            inside = offset - self._starts[k]
            n = min(len(part) - inside, end - offset)
            if n > 0:
                yield part[inside : inside + n]
                offset += n
            k += 1
