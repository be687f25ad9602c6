"""What the live and offline backup sessions share: cleanup trouble goes to the log and to the
report's notes (never raised over the caller's own error), and `with` ends the session."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Self


class NotingSession:
    """Subclasses set `domain_name` and `notes` and implement `finish`."""

    domain_name: str
    notes: list[str]

    def finish(self, ok: bool) -> None:
        raise NotImplementedError

    def _note(self, text: str) -> None:
        logging.getLogger(type(self).__module__).warning("%s: %s", self.domain_name, text)
        self.notes.append(text)

    def _note_if(self, text: str | None) -> None:
        if text:
            self._note(text)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(ok=et is None)
