"""A restore over a remote libvirt URI builds the disk's qcow2 image locally before its
upload (volume_upload.py). A killed restore cannot remove it, and it can be as large as the
disk: it lives in the process's private directory (private_tmp.py), which the next vmkeep
process removes once its owner is gone. Before, it was a bare /tmp/vmkeep-upload-*.qcow2
that no one ever removed (CI runs left one per killed-restore test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vmkeep.private_tmp import PREFIX

KILLED = """
import os, signal
from vmkeep.connectors.libvirt.restore.volume_upload import UploadingVolumeWriter
writer = UploadingVolumeWriter(None, None, 64 << 20, "vda")
writer.write(0, b"x" * 65536)
os.kill(os.getpid(), signal.SIGKILL)
"""

NEXT = """
from vmkeep.private_tmp import private_dir
print(private_dir())
"""


def _run(code: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TMPDIR=str(tmp))
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_a_killed_uploads_image_is_removed_by_the_next_process(tmp_path: Path) -> None:
    assert _run(KILLED, tmp_path).returncode == -9
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(PREFIX)
    (image,) = left.iterdir()
    assert image.name.startswith("upload-") and image.stat().st_size > 65536
    mine = Path(_run(NEXT, tmp_path).stdout.strip())
    assert not left.exists()  # the killed process's directory, image and all, is gone
    assert not mine.exists()  # and the next one removed its own at exit
    assert list(tmp_path.iterdir()) == []
