"""What SMB failures mean to the user: NTSTATUS codes and transport errors turned into
vmkeep's errors, and whether another attempt may succeed."""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from smbprotocol.exceptions import (  # type: ignore[import-untyped]
    SMBException,
    SMBResponseException,
)
from smbprotocol.header import NtStatus  # type: ignore[import-untyped]

from vmkeep.errors import RemoteError, RemoteFullError

if TYPE_CHECKING:
    from .target import Target

# NTSTATUS values smbprotocol does not name.
_STATUS_QUOTA_EXCEEDED = 0xC0000044
_STATUS_MEDIA_WRITE_PROTECTED = 0xC00000A2
_STATUS_ACCOUNT_RESTRICTION = 0xC000006E
_STATUS_INVALID_LOGON_HOURS = 0xC000006F
_STATUS_INVALID_WORKSTATION = 0xC0000070
_STATUS_ACCOUNT_DISABLED = 0xC0000072
_STATUS_ACCOUNT_EXPIRED = 0xC0000193
_STATUS_PASSWORD_MUST_CHANGE = 0xC0000224
_STATUS_ACCOUNT_LOCKED_OUT = 0xC0000234
_STATUS_NETWORK_SESSION_EXPIRED = 0xC000035C
_STATUS_INVALID_HANDLE = 0xC0000008
_STATUS_CONNECTION_DISCONNECTED = 0xC000020C
_STATUS_CONNECTION_RESET = 0xC000020D

_STATUS_NAMES: dict[int, str] = {
    v: k for k, v in vars(NtStatus).items() if k.startswith("STATUS_")
} | {
    _STATUS_QUOTA_EXCEEDED: "STATUS_QUOTA_EXCEEDED",
    _STATUS_MEDIA_WRITE_PROTECTED: "STATUS_MEDIA_WRITE_PROTECTED",
    _STATUS_ACCOUNT_DISABLED: "STATUS_ACCOUNT_DISABLED",
    _STATUS_ACCOUNT_LOCKED_OUT: "STATUS_ACCOUNT_LOCKED_OUT",
    _STATUS_NETWORK_SESSION_EXPIRED: "STATUS_NETWORK_SESSION_EXPIRED",
}
NOT_FOUND = {
    NtStatus.STATUS_OBJECT_NAME_NOT_FOUND,
    NtStatus.STATUS_OBJECT_PATH_NOT_FOUND,
    NtStatus.STATUS_NO_SUCH_FILE,
    NtStatus.STATUS_NOT_FOUND,
    NtStatus.STATUS_DELETE_PENDING,  # being deleted: as good as gone
}
_AUTH_FAILED = {
    NtStatus.STATUS_LOGON_FAILURE,
    NtStatus.STATUS_WRONG_PASSWORD,
    NtStatus.STATUS_PASSWORD_EXPIRED,
    _STATUS_ACCOUNT_RESTRICTION,
    _STATUS_INVALID_LOGON_HOURS,
    _STATUS_INVALID_WORKSTATION,
    _STATUS_ACCOUNT_DISABLED,
    _STATUS_ACCOUNT_EXPIRED,
    _STATUS_PASSWORD_MUST_CHANGE,
    _STATUS_ACCOUNT_LOCKED_OUT,
}
# Worth another attempt; the first group also means the connection (session, tree) is gone.
RECONNECT = {
    NtStatus.STATUS_NETWORK_NAME_DELETED,
    NtStatus.STATUS_USER_SESSION_DELETED,
    _STATUS_NETWORK_SESSION_EXPIRED,
    _STATUS_INVALID_HANDLE,
    NtStatus.STATUS_FILE_CLOSED,
    _STATUS_CONNECTION_DISCONNECTED,
    _STATUS_CONNECTION_RESET,
}
TRANSIENT = RECONNECT | {
    NtStatus.STATUS_INSUFFICIENT_RESOURCES,
    NtStatus.STATUS_INSUFF_SERVER_RESOURCES,
    NtStatus.STATUS_IO_TIMEOUT,
    NtStatus.STATUS_REQUEST_NOT_ACCEPTED,
    NtStatus.STATUS_SERVER_UNAVAILABLE,
    NtStatus.STATUS_SHARING_VIOLATION,  # another client holds the file for a moment
}
# Errors of the transport (socket, timeouts, smbprotocol's worker thread): drop the connection.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    SMBException,
    OSError,
    ValueError,
    EOFError,
    TimeoutError,
    KeyError,  # smbprotocol's worker meeting an answer it did not expect
)


def status_name(status: int) -> str:
    return _STATUS_NAMES.get(status) or f"NTSTATUS 0x{status:08x}"


class Failure(Exception):
    """One attempt failed: `error` is what the user sees if no attempt succeeds. `quick`: a
    pooled connection had gone stale, so the next attempt may start at once."""

    def __init__(self, error: RemoteError, *, retry: bool = False, quick: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry = retry
        self.quick = quick


def reason(exc: BaseException) -> str:
    """A one-line cause for a transport failure, without smbprotocol's noise."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low or isinstance(exc, TimeoutError):
        return "timed out"
    if "name or service not known" in low or "nodename nor servname" in low or "gaierror" in low:
        return "host name not found"
    if "reset" in low or "closed" in low or "broken pipe" in low:
        return "connection lost"
    return text


def auth_failure(target: Target, detail: str) -> Failure:
    """Logging on failed: never worth another attempt. `detail` follows the message as is."""
    return Failure(
        RemoteError(f"authentication failed for {target.username} on {target.where}{detail}")
    )


def setup_failure(status: int, target: Target) -> Failure:
    """The server refused the session setup or the tree connect with `status`."""
    if status in _AUTH_FAILED:
        hint = "wrong user name or password, " if status == NtStatus.STATUS_LOGON_FAILURE else ""
        return auth_failure(target, f" ({hint}{status_name(status)})")
    if status == NtStatus.STATUS_BAD_NETWORK_NAME:
        return Failure(RemoteError(f"share {target.share!r} does not exist on {target.where}"))
    if status == NtStatus.STATUS_ACCESS_DENIED:
        return Failure(
            RemoteError(f"permission denied: {target.username} may not use share {target.share!r}")
        )
    return Failure(
        RemoteError(
            f"cannot connect to share {target.share!r} on {target.where}: {status_name(status)}"
        ),
        retry=status in TRANSIENT,
    )


def status_failure(status: int, action: str, where: str) -> Failure:
    """Turn a status into the user's error for `action` ("writing", ...) on `where`."""
    if status in (NtStatus.STATUS_DISK_FULL, _STATUS_QUOTA_EXCEEDED):
        return Failure(RemoteFullError(f"remote is full: no space left {action} {where}"))
    if status == _STATUS_MEDIA_WRITE_PROTECTED:
        return Failure(RemoteError(f"remote is read-only: cannot {action.split()[0]} {where}"))
    if status == NtStatus.STATUS_ACCESS_DENIED:
        return Failure(RemoteError(f"permission denied {action} {where}"))
    if status in NOT_FOUND:
        return Failure(RemoteError(f"not found {action} {where}"))
    return Failure(
        RemoteError(f"{status_name(status)} {action} {where}"), retry=status in TRANSIENT
    )


def fail(exc: SMBResponseException, action: str, where: str) -> NoReturn:
    """Raise the user's error for a refused request; a status that means the connection is
    gone stays as it is, so that the pool drops the connection."""
    if exc.status in RECONNECT:
        raise exc
    raise status_failure(exc.status, action, where) from exc


def check(result: bytes | SMBResponseException, action: str, where: str) -> bytes:
    """The body of a successful answer; else raise as `fail` does."""
    if isinstance(result, SMBResponseException):
        fail(result, action, where)
    return result


def has_status(result: bytes | SMBResponseException, *statuses: int) -> bool:
    """Whether an answer of a compound is a refusal with one of `statuses`."""
    return isinstance(result, SMBResponseException) and result.status in statuses


def missing(result: bytes | SMBResponseException, *also: int) -> bool:
    """Whether a CREATE failed because the path is not there (or with a status in `also`)."""
    return has_status(result, *NOT_FOUND, *also)
