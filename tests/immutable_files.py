"""Directories whose files tests make immutable (`chattr +i`, the local remote's retention
lock): a test's remote in its temporary directory, with the attribute lifted afterwards, or
pytest could not remove the directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.remotes.file_attributes import set_immutable


def lift_all(root: Path) -> None:
    """Test teardown: clear the attribute on every file under `root` (as root)."""
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            path = os.path.join(dirpath, fn)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                set_immutable(fd, False)
            finally:
                os.close(fd)


def immutable_vault(tmp_path: Path) -> Iterator[Path]:
    """The body of a fixture: `tmp_path/vault` (not created), every file under it lifted at
    teardown; skips unless root (CAP_LINUX_IMMUTABLE)."""
    if os.geteuid() != 0:
        pytest.skip("the immutable attribute needs root (CAP_LINUX_IMMUTABLE)")
    vault = tmp_path / "vault"
    try:
        yield vault
    finally:
        lift_all(vault)
