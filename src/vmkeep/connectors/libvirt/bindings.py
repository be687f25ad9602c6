"""Lazy access to the libvirt and libnbd Python bindings (libvirt-python from the lock, Debian's
python3-libnbd linked into the venv: scripts/setup.sh --libvirt). They are optional: vmkeep
without them must still import, so they are loaded on first use and typed as Any, and failures
become one-line errors."""

from __future__ import annotations

import importlib
from typing import Any

from vmkeep.errors import ConnectorError

_modules: dict[str, Any] = {}

_INSTALL_HINT = {
    "libvirt": "libvirt-python",
    "libvirt_qemu": "libvirt-python",
    "nbd": "Debian's python3-libnbd",
}


def _load(name: str) -> Any:
    mod = _modules.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            raise ConnectorError(
                f"the Python module {name!r} is missing: install {_INSTALL_HINT[name]} "
                "(scripts/setup.sh --libvirt does both)"
            ) from None
        if name == "libvirt":
            # The C library prints every error to stderr; they reach us as exceptions anyway.
            mod.registerErrorHandler(lambda _ctx, _err: None, None)
        _modules[name] = mod
    return mod


def libvirt() -> Any:
    """The `libvirt` module."""
    return _load("libvirt")


def nbd() -> Any:
    """The libnbd `nbd` module."""
    return _load("nbd")


def nbd_handle() -> Any:
    """A new libnbd handle that does not zero each read buffer first. libnbd clears it by
    default so that a caller ignoring a failed read cannot see stale heap bytes; every pread of
    vmkeep raises on failure and its buffer is then dropped, and the memset cost 2% of a live
    backup's CPU (perf, LIBVIRT-NOTES §15)."""
    h = nbd().NBD()
    h.set_pread_initialize(False)
    return h


def is_libvirt_error(exc: BaseException) -> bool:
    mod = _modules.get("libvirt")
    return mod is not None and isinstance(exc, mod.libvirtError)


def error_code(exc: BaseException) -> int | None:
    """libvirt's VIR_ERR_* code of a libvirtError, else None."""
    if not is_libvirt_error(exc):
        return None
    code = exc.get_error_code()  # type: ignore[attr-defined]
    return int(code) if code is not None else None


def one_line(exc: BaseException) -> str:
    """The message of a libvirt/libnbd error on one line (they may span several)."""
    msg = str(exc)
    if is_libvirt_error(exc):
        msg = exc.get_error_message() or msg  # type: ignore[attr-defined]
    return " ".join(str(msg).split()) or type(exc).__name__
