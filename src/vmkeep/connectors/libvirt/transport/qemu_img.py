"""`qemu-img` run where a shut-off domain's images are: on this host, or on the host of a
qemu+ssh:// URI. libvirt cannot add or remove a bitmap in an inactive domain's image
(offline_checkpoint.py), and over a remote URI vmkeep cannot open the image files itself.

Remote commands go in batches, one ssh session per batch (over the run's shared connection,
ssh_master.py, ~0.15 s; a login of its own costs 0.2-0.4 s): an offline run asks the same of
every disk at once (info, `bitmap --add`, `bitmap --remove`). The batch
script runs each command with its output in a private directory and frames the results as

    <exit status> <stdout bytes> <stderr bytes>\\n<stdout><stderr>

so one command's failure does not hide the others' results."""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vmkeep.connectors.libvirt.transport.ssh_nbd import SshTarget, is_ssh_uri
from vmkeep.errors import ConnectorError

TIMEOUT = 120.0  # one qemu-img command (a large image's bitmap is written in full)
_BATCH = r"""command -v qemu-img >/dev/null 2>&1 || {
  echo "qemu-img is not installed on this host (Debian: qemu-utils)" >&2; exit 127; }
t=$(mktemp -d) || exit 1
trap 'rm -rf "$t"' EXIT
for c; do
  eval "qemu-img $c" >"$t/o" 2>"$t/e" </dev/null
  rc=$?
  printf '%s %s %s\n' "$rc" $(wc -c <"$t/o") $(wc -c <"$t/e")
  cat "$t/o" "$t/e"
done
"""


@dataclass(frozen=True)
class QemuImgRun:
    """What one `qemu-img` command answered."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """qemu-img's message on one line, without its "qemu-img: " prefixes."""
        lines = [ln.strip().removeprefix("qemu-img: ") for ln in self.stderr.splitlines()]
        return " ".join(" ".join(lines).split()) or f"exit status {self.returncode}"


class QemuImg(Protocol):
    """Runs `qemu-img ARGS` for each command, where the images are."""

    host: str  # "" for this host; else the ssh host (for messages)

    def run_each(self, commands: Sequence[Sequence[str]]) -> list[QemuImgRun]: ...


class LocalQemuImg:
    host = ""

    def run_each(self, commands: Sequence[Sequence[str]]) -> list[QemuImgRun]:
        return [self._run(c) for c in commands]

    @staticmethod
    def _run(args: Sequence[str]) -> QemuImgRun:
        try:
            done = subprocess.run(
                ["qemu-img", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ConnectorError(f"qemu-img {args[0]} failed: {exc}") from None
        return QemuImgRun(done.returncode, done.stdout, done.stderr)


class SshQemuImg:
    """qemu-img on the host of a qemu+ssh:// URI, one ssh login per batch."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self.host = target.host

    def run_each(self, commands: Sequence[Sequence[str]]) -> list[QemuImgRun]:
        if not commands:
            return []
        quoted = [shlex.join(c) for c in commands]
        out = self.target.run_bytes(
            _BATCH, quoted, "run qemu-img", timeout=TIMEOUT * len(commands) + 30
        )
        runs = []
        for _ in commands:
            head, sep, out = out.partition(b"\n")
            try:
                rc, n_out, n_err = (int(x) for x in head.split())
            except ValueError:
                raise ConnectorError(
                    f"unexpected qemu-img output from {self.host}: {head[:80]!r}"
                ) from None
            if not sep or len(out) < n_out + n_err:
                raise ConnectorError(f"qemu-img output from {self.host} was cut short")
            stdout, stderr = out[:n_out], out[n_out : n_out + n_err]  # bytes, not characters
            runs.append(QemuImgRun(rc, _text(stdout), _text(stderr)))
            out = out[n_out + n_err :]
        return runs


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


LOCAL = LocalQemuImg()


def for_uri(uri: str, local: bool) -> QemuImg | None:
    """Where qemu-img reaches the images of `uri`'s domains: here for a local URI, over ssh
    for a qemu+ssh:// one; None for other remote transports (no way to run it there)."""
    if local:
        return LOCAL
    return SshQemuImg(SshTarget.from_uri(uri)) if is_ssh_uri(uri) else None


def where(tool: QemuImg) -> str:
    """For messages: ' on HOST over ssh', or '' for this host."""
    return f" on {tool.host} over ssh" if tool.host else ""


def image_infos(tool: QemuImg, images: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`qemu-img info` of each image; a ConnectorError (one line) when one cannot be read."""
    infos = {}
    for image, run in zip(images, tool.run_each([info_args(i) for i in images]), strict=True):
        if run.returncode != 0:
            raise ConnectorError(f"cannot inspect {image}{where(tool)}: {run.error}")
        try:
            infos[image] = json.loads(run.stdout)
        except ValueError:
            raise ConnectorError(f"qemu-img info {image}{where(tool)}: unreadable output") from None
    return infos


def info_args(image: str) -> list[str]:
    return ["info", "-f", "qcow2", "--output=json", "--", image]


def bitmaps(info: dict[str, Any]) -> dict[str, list[str]]:
    """Persistent bitmaps in a qcow2 image's info: name -> flags ('auto' = recording, 'in-use'
    = not stored cleanly, i.e. QEMU died with the image open)."""
    data = info.get("format-specific", {}).get("data", {})
    return {str(b.get("name")): list(b.get("flags", [])) for b in data.get("bitmaps", [])}


def is_qcow2_v2(info: dict[str, Any]) -> bool:
    """compat 0.10: no room for bitmaps."""
    return str(info.get("format-specific", {}).get("data", {}).get("compat")) == "0.10"


def add_bitmaps(tool: QemuImg, images: Sequence[str], name: str) -> dict[str, str]:
    """Add the recording bitmap `name` to each image; image -> error for those that failed."""
    runs = tool.run_each([["bitmap", "--add", "--", i, name] for i in images])
    return {i: r.error for i, r in zip(images, runs, strict=True) if r.returncode != 0}


def remove_bitmaps(tool: QemuImg | None, images: Iterable[str], name: str) -> list[str]:
    """Remove the bitmap `name` from each image; the images that may still hold it (None: no
    way to run qemu-img there, all of them)."""
    return [image for image, _ in remove_each(tool, [(i, name) for i in images])]


def remove_each(tool: QemuImg | None, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Remove each (image, bitmap); the pairs that may still be there. A bitmap already gone
    counts as removed."""
    if tool is None:
        return list(pairs)
    try:
        runs = tool.run_each([["bitmap", "--remove", "--", i, b] for i, b in pairs])
    except ConnectorError:
        return list(pairs)
    return [
        pair
        for pair, r in zip(pairs, runs, strict=True)
        if r.returncode != 0 and "not found" not in r.stderr.lower()
    ]
