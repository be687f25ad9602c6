"""The environment the tests run in is the locked one: what passes here is what a fresh machine
gets from scripts/setup.sh (issue: Debian's dist-packages leaked into the venv)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", re.MULTILINE)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_no_debian_dist_packages_on_the_path() -> None:
    assert sys.prefix != sys.base_prefix, "the tests must run in the virtualenv"
    assert not [p for p in sys.path if "dist-packages" in p]
    assert importlib.util.find_spec("OpenSSL") is None  # Debian's pyOpenSSL 23 broke S3 stderr


def test_every_installed_distribution_is_the_locked_version() -> None:
    locked = {
        _canonical(n): v for n, v in PIN.findall((ROOT / "requirements/test.txt").read_text())
    }
    installed = {
        _canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
    }
    installed.pop("vmkeep")
    unlocked = {n: v for n, v in installed.items() if n not in locked and n != "pip"}
    assert not unlocked, f"installed but not in requirements/test.txt: {unlocked}"
    drift = {n: (v, locked[n]) for n, v in installed.items() if n in locked and v != locked[n]}
    assert not drift, f"installed version differs from the lock: {drift}"


def test_libnbd_binding_alone_comes_from_debian() -> None:
    nbd = importlib.util.find_spec("nbd")
    if nbd is None:
        pytest.skip("libnbd binding not linked: scripts/setup.sh --libvirt or --test links it")
    origin = Path(nbd.origin or "")
    assert origin.is_relative_to(sys.prefix)  # linked into the venv...
    assert origin.resolve() == Path("/usr/lib/python3/dist-packages/nbd.py")  # ...from Debian
    libvirt = importlib.util.find_spec("libvirt")
    assert libvirt is not None and libvirt.origin is not None
    assert Path(libvirt.origin).is_relative_to(sys.prefix)
    assert not Path(libvirt.origin).is_symlink()  # libvirt-python built from the lock
