"""The FUSE image's name comes from the disk's name, which the restore point records (a
hostile remote can choose it): always one harmless path component."""

from __future__ import annotations

import pytest

from vmkeep.operations.mount import image_name


@pytest.mark.parametrize(
    ("disk", "name"),
    [
        ("vda", "vda.raw"),
        ("disk0", "disk0.raw"),
        ("../../etc/passwd", "_.._etc_passwd.raw"),
        ("/", "_.raw"),
        ("..", "disk.raw"),
        ("", "disk.raw"),
        ("a\nb\0c", "a_b_c.raw"),
    ],
)
def test_image_name_is_one_safe_component(disk: str, name: str) -> None:
    got = image_name(disk)
    assert got == name
    assert "/" not in got and "\0" not in got and not got.startswith(".")
