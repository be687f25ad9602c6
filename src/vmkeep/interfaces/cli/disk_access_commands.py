"""`vmkeep serve-nbd`, `vmkeep mount`, `vmkeep umount`: a restore point's disk, read-only,
without restoring it (docs/MOUNT-EXPORT.md). Operations are imported only when a command
runs, so `vmkeep --help` loads neither the repository nor FUSE."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import typer

from vmkeep.errors import UsageError

from .context import state
from .output import human_bytes
from .repo_commands import JsonOpt, RemoteOpt

PointArg = typer.Argument(..., help="Restore point id (or a unique prefix).")
DiskArg = typer.Argument(..., help="Disk name, as `vmkeep list --json` shows it.")


def serve_nbd(
    point: str = PointArg,
    disk: str = DiskArg,
    socket_path: Path | None = typer.Option(
        None, "--socket", help="Listen on this Unix socket (mode 0600; removed at exit)."
    ),
    port: int | None = typer.Option(
        None, "--port", help="Listen on this TCP port (default 10809; 0: any free port)."
    ),
    bind: str = typer.Option(
        "127.0.0.1", "--bind", help="TCP address to listen on (NBD has no authentication)."
    ),
    remote: str | None = RemoteOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Export one disk of a restore point read-only over NBD until SIGINT or SIGTERM.

    Holes are reported through block status (base:allocation), so `qemu-img convert` and
    `nbdcopy` skip them; the first line printed is the address (nbd+unix:// or nbd://)."""
    from vmkeep.operations.nbd_server import Listen, NbdServer
    from vmkeep.operations.point_disk import open_point_disk

    if socket_path is not None and port is not None:
        raise UsageError("give --socket or --port, not both")
    if port is not None and not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: must be between 0 and 65535")
    listen = Listen(socket_path, bind, 10809 if port is None else port)
    repo = state.open_repository(remote)
    with open_point_disk(repo, point, disk) as view:
        server = NbdServer(view, disk, listen)
        _stop_on_signals(server.stop)
        if json_out:
            print(json.dumps({"uri": server.uri, "size": view.size}))  # one line: a stream
        else:
            print(f"{server.uri}  ({human_bytes(view.size)}, read-only; Ctrl-C stops)")
        sys.stdout.flush()
        stats = server.serve()
    if not json_out:
        print(
            f"stopped: {stats.clients} clients, {stats.requests} requests, "
            f"{human_bytes(stats.bytes_read)} read, {view.stats.chunks} chunks fetched",
            file=sys.stderr,
        )


def mount(
    point: str = PointArg,
    disk: str = DiskArg,
    mountpoint: Path = typer.Argument(..., help="An existing directory to mount on."),
    foreground: bool = typer.Option(
        False, "--foreground", help="Serve in this process until unmounted or interrupted."
    ),
    remote: str | None = RemoteOpt,
) -> None:
    """Expose one disk of a restore point as a read-only raw image file, DISK.raw, in
    MOUNTPOINT (FUSE), for losetup -r, mount -o ro, fsck -n or any tool reading files.

    Without --foreground the command returns once the mount is ready and a background
    process serves it until `vmkeep umount MOUNTPOINT`."""
    from vmkeep.operations.mount import check_mountpoint, image_name
    from vmkeep.operations.point_disk import open_point_disk

    check_mountpoint(mountpoint)
    repo = state.open_repository(remote)
    with open_point_disk(repo, point, disk) as view:  # errors here: before anything mounts
        if foreground:
            from vmkeep.operations.mount import serve_mount

            print(f"{mountpoint / image_name(disk)}  (read-only; Ctrl-C or umount stops)")
            sys.stdout.flush()
            serve_mount(view, disk, mountpoint)
            return
    from .mount_spawn import mount_in_background

    secret = state.passphrase() if repo.encrypted else None
    mount_in_background(point, disk, mountpoint, remote, secret)
    print(mountpoint / image_name(disk))


def umount(
    mountpoint: Path = typer.Argument(..., help="Where `vmkeep mount` mounted a disk."),
) -> None:
    """Unmount a `vmkeep mount`; its serving process then exits."""
    from .mount_spawn import unmount

    unmount(mountpoint)


def _stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGINT and SIGTERM end the server cleanly (the socket is removed)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def register(app: typer.Typer) -> None:
    app.command("serve-nbd")(serve_nbd)
    app.command("mount")(mount)
    app.command("umount")(umount)
