"""Running vmkeep's CLI in a process that dies (os._exit(9)) at a chosen instant: the script
patches the step it dies at, then runs the CLI's main (tests/e2e/test_remote_kills.py,
test_format3_kills.py, test_format3_concurrency.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .conftest import VMKEEP, Cli

PYTHON = str(Path(VMKEEP).with_name("python"))

# The process dies half-way through a send once more than DIE_AFTER bytes went out in all
# (chunk bodies are nearly all of it): an upload cut mid-request, as a SIGKILL during an upload
# would. Every send counts: how a body is split into sends depends on the HTTP stack (Debian's
# urllib3 1.26 streams botocore's aws-chunked bodies in 8 KiB blocks, urllib3 2 in larger ones).
DIE_MID_BODY = """
import os, socket, sys, threading
limit, sent, guard = int(os.environ["DIE_AFTER"]), [0], threading.Lock()
def cut(send):
    def wrapper(self, data, *args):
        view = memoryview(data).cast("B")
        with guard:
            sent[0] += len(view)
            if sent[0] > limit:
                send(self, view[: len(view) // 2], *args)
                os._exit(9)
        return send(self, data, *args)
    return wrapper
socket.socket.sendall = cut(socket.socket.sendall)
socket.socket.send = cut(socket.socket.send)
from vmkeep.interfaces.cli.app import main
sys.argv = ["vmkeep", *sys.argv[1:]]
main()
"""


def dies(cli: Cli, script: str, *args: str, **env: str) -> None:
    """Runs `script` with the CLI arguments `args` and `env` added to `cli`'s environment;
    it must have died where it was told to."""
    done = subprocess.run(
        [PYTHON, "-c", script, *args],
        env=dict(cli.env, **env),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 9, done.stderr[-2000:]
