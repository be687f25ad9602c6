"""What the image writers (qcow2_writer, vhd_writer) share: one descriptor written in place,
and a close that writes the format's metadata last, then fsyncs."""

from __future__ import annotations

import os
from pathlib import Path

from vmkeep.errors import ConnectorError


class ImageFile:
    """Subclasses open `_fd` on `path` and write the format's tables in `_finish`; the data
    written before is only reachable once they are there, so they come last."""

    path: Path
    _fd: int

    def close(self) -> None:
        """Write the format's metadata, then fsync. Calling it again does nothing."""
        if self._fd < 0:
            return
        try:
            self._before_finish()
            self._finish()
            os.fsync(self._fd)
        except OSError as exc:
            raise ConnectorError(f"cannot write {self.path}: {exc.strerror}") from None
        finally:
            self._release()
            os.close(self._fd)
            self._fd = -1

    def _before_finish(self) -> None:
        """Writes still in flight land first (the qcow2 writer's direct-I/O queue)."""

    def _finish(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """Anything else the writer holds open, closed whatever happened."""
