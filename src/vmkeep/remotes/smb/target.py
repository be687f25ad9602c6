"""Where and as whom an SMB remote connects: shared by its connections, its pool and its
error messages."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PORT = 445


@dataclass(frozen=True)
class Target:
    """Where and as whom to connect; shared by every connection of a remote."""

    host: str
    port: int
    share: str
    username: str
    password: str = field(repr=False)
    connect_timeout: float
    request_timeout: float
    require_signing: bool
    encrypt: bool | None

    @property
    def where(self) -> str:
        return f"SMB server {self.host}:{self.port}"
