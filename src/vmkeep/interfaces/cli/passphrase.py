"""Where the repository passphrase comes from, apart from output.py: the CLI reads it before
typer and rich are imported to start the key derivation early (early_open.py)."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from vmkeep.errors import UsageError


class PassphraseSource:
    """The passphrase from a file, VMKEEP_PASSPHRASE, or a prompt — never from an argument."""

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self._cached: bytes | None = None

    def __call__(self, confirm: bool = False) -> bytes:
        if self._cached is None:
            passphrase = self._read(confirm)
            if not passphrase:  # whatever the source: the prompt always refused it
                raise UsageError(f"empty passphrase (from {self.origin()}): refusing it")
            self._cached = passphrase
        return self._cached

    def origin(self) -> str:
        if self.file is not None:
            return f"passphrase file {self.file}"
        return "VMKEEP_PASSPHRASE" if "VMKEEP_PASSPHRASE" in os.environ else "the prompt"

    def _read(self, confirm: bool) -> bytes:
        if self.file is not None:
            try:
                return read_passphrase_file(self.file)
            except OSError as exc:
                raise UsageError(
                    f"cannot read passphrase file {self.file}: {exc.strerror}"
                ) from exc
        env = os.environ.get("VMKEEP_PASSPHRASE")
        if env is not None:
            return os.fsencode(env)  # the bytes as given, even when not UTF-8
        if sys.stdin is None or sys.stdin.closed or not sys.stdin.isatty():
            raise UsageError(
                "no passphrase: set VMKEEP_PASSPHRASE, use --passphrase-file, or run in a terminal"
            )
        try:
            first = getpass.getpass("Repository passphrase: ")
            if confirm and getpass.getpass("Repeat passphrase: ") != first:
                raise UsageError("the passphrases do not match")
        except EOFError:
            raise UsageError("no passphrase: the terminal closed before one was entered") from None
        return os.fsencode(first)


MAX_PASSPHRASE_FILE = 4096  # a passphrase, not a key file: /dev/zero must not fill memory


def read_passphrase_file(path: Path) -> bytes:
    """At most MAX_PASSPHRASE_FILE bytes (one trailing newline dropped); a longer file is
    refused rather than read whole."""
    with path.open("rb") as f:
        data = f.read(MAX_PASSPHRASE_FILE + 1)
    if len(data) > MAX_PASSPHRASE_FILE:
        raise UsageError(
            f"passphrase file {path} is larger than {MAX_PASSPHRASE_FILE} bytes: "
            "is it the right file?"
        )
    return data.rstrip(b"\r\n")
